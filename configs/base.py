"""Base config: every field of an experiment, with the VDM paper's CIFAR-10 defaults.

Derived configs (``cifar10.py``, ``digits.py``, ...) import :func:`get_config` and change a
few fields. Any field can be overridden on the command line, e.g.
``--config.training.batch_size=64``; :func:`vdm_jax.runner.config_validation.validate` checks every
value before a run starts.

Fields:
  seed: one seed for initialisation, training randomness, data order, eval and sampling.
  data.name: a dataset of :data:`vdm_jax.runner.data.DATASETS`.
  data.vocab_size: K, checked against the dataset (the bpd depends on it).
  data.data_dir: TFDS data directory (None: TFDS's default).
  data.augment: random dihedral (D4) augmentation of training images.
  model.*: the noise schedule (a :data:`vdm_jax.schedules.SCHEDULES` entry, whose settings
    record reads and checks the fields it uses), the loss and the score U-Net (see
    :mod:`vdm_jax.unet`). ``conditioning`` is a
    :data:`vdm_jax.runner.conditioning.CONDITIONINGS` entry: "none", "label" (the dataset's class)
    or "augmentation" (the D4 index; needs ``data.augment``; evaluation and sampling use the
    identity, 0). ``parameterization`` (a :data:`vdm_jax.parameterizations.PARAMETERIZATIONS`
    entry) is what the network predicts: "eps", "x", "v", "categorical" (logits over the
    data's values) or "discretized_logistic" (a logistic's location and scale, discretised
    to the data's values). ``weighting`` (a
    :data:`vdm_jax.weightings.WEIGHTINGS` entry) weights the denoiser's diffusion loss by
    log-SNR; ``weighting_bias`` is the sigmoid weighting's bias. ``adaptive_time`` draws
    training times from an importance distribution tracked during training. The
    ``per_dim_*`` schedules give one gamma per dimension (``schedule_per="dimension"``) or
    per channel; ``latent_dim > 0`` makes such a schedule input-adaptive through an
    auxiliary latent (MuLAN), whose KL joins the bound as ``bpd_latent``.
  optimizer.*: AdamW with linear warmup, an optional cosine decay to 0 at ``decay_steps``,
    optional global-norm clipping (0 disables), EMA.
  training.*: global batch size, number of steps, and how often (in steps) to log, evaluate,
    draw samples and save checkpoints; the last ``max_to_keep`` checkpoints are kept.
  eval.*: global batch size, method (a :data:`vdm_jax.runner.eval_methods.EVAL_METHODS` entry) and
    its settings for the whole-split bpd.
  sample.*: number of samples, global batch, sampler steps, sampler and decoding (names of
    :data:`vdm_jax.samplers.SAMPLER_NAMES` and :data:`vdm_jax.samplers.DECODERS`), and the
    adaptive ODE sampler's tolerance.
  sharding.fsdp: over how many devices the train state (parameters, EMA, optimizer state)
    is split (FSDP, :mod:`vdm_jax.runner.sharding`); 1 replicates it (data parallelism), -1 splits
    it over every device. It must divide the device count. Batches are always split over
    every device.
  sharding.min_shard_bytes: arrays smaller than this stay replicated.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """All fields, with the paper's CIFAR-10 settings (no augmentation)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"
    config.data.vocab_size = 256
    config.data.data_dir = config_dict.placeholder(str)
    config.data.augment = False

    config.model = ml_collections.ConfigDict()
    # Noise schedule: monotone network with learned endpoints (paper, appendix).
    config.model.schedule = "monotone_net"
    config.model.schedule_width = 1024  # Hidden width of the network schedules.
    # "learned_cosine" only: the offset s of Improved DDPM's cosine schedule, in [0, 1].
    config.model.cosine_s = 0.008
    # Per-dimension schedules ("per_dim_*"): one gamma per "dimension" or per "channel".
    config.model.schedule_per = "dimension"
    # > 0: an auxiliary latent c ~ q(c | x) of this size adapts a per-dimension schedule to
    # the input (MuLAN); its encoder's width is latent_channels.
    config.model.latent_dim = 0
    config.model.latent_channels = 32
    config.model.gamma_min = -13.3
    config.model.gamma_max = 5.0
    # "variance": endpoints on the ELBO, interior on the variance of the loss (paper, sec. 5).
    config.model.schedule_grad = "variance"
    config.model.timesteps = 0  # 0: continuous time; T > 0: the T-step discrete loss.
    config.model.antithetic_time = True
    config.model.conditioning = "none"
    # Score network: the paper's CIFAR-10 U-Net.
    config.model.num_blocks = 32
    config.model.channels = 128
    config.model.dropout_rate = 0.1
    config.model.attention = "middle"
    config.model.fourier_features = True
    config.model.fourier_min_exp = 6
    config.model.fourier_max_exp = 7
    config.model.num_groups = 32
    config.model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16".
    config.model.remat = False
    # Reference-layout options: the model of a released google-research/vdm checkpoint sets
    # them (configs/cifar10.py:reference; experiments/import_reference.py).
    config.model.label_input = "embed"  # "embed": label embedding; "flag": reference's flag.
    config.model.min_group_size = 4  # GroupNorm channels per group, at least.
    config.model.add_z_to_eps = False  # The reference predicts eps_hat = net(z) + z.
    # What the network predicts (a vdm_jax.parameterizations.PARAMETERIZATIONS entry): "eps",
    # "x", "v" (= alpha eps - sigma x), "categorical" (K logits per channel, read as the
    # posterior mean over the data's values) or "discretized_logistic" (2 per channel: a
    # logistic over the values, then as categorical); the loss and samplers get the eps_hat.
    config.model.parameterization = "eps"
    # The denoiser's training loss (a vdm_jax.weightings.WEIGHTINGS entry): "elbo" (w = 1),
    # "sigmoid" (w = sigmoid(weighting_bias - log SNR)) or "edm" (Kingma & Gao 2023). The
    # schedule's endpoints always train on the ELBO, and evaluation always reports it.
    config.model.weighting = "elbo"
    config.model.weighting_bias = 0.0
    # True: training times from q(t) ~ the RMS of the diffusion integrand, tracked over
    # training (VDM++'s adaptive importance distribution; continuous time only).
    config.model.adaptive_time = False
    # M > 1: M score networks, initialised and trained independently (each on its own times
    # and noise, the same batches) under one shared schedule; evaluation and sampling use
    # the mean of their eps_hat (vdm_jax/runner/ensemble.py). On a mesh whose "data" axis divides
    # M, each device trains its own members on the whole batch.
    config.model.ensemble_size = 1

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 100
    # > 0: the learning rate follows a cosine from its peak down to 0 at this update.
    config.optimizer.decay_steps = 0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.99
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.01
    config.optimizer.grad_clip_norm = 0.0  # 0: no clipping.
    config.optimizer.ema_rate = 0.9999

    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 128
    config.training.num_steps = 10_000_000
    config.training.log_every = 100
    config.training.eval_every = 50_000
    config.training.sample_every = 50_000
    config.training.checkpoint_every = 5_000
    config.training.max_to_keep = 3

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 128
    # A vdm_jax.runner.eval_methods.EVAL_METHODS entry. "elbo": the negative ELBO (an upper bound on
    # -log P(x)) with the training estimator (times (u + i/B) mod 1 over the batch);
    # "elbo_stratified": the same bound with stratified times per image in 2 independent
    # replicates, giving a Monte Carlo standard error; "elbo_shifted": the same with a randomly
    # shifted even grid of times; "elbo_importance": as stratified, under
    # a proposal q(t) fitted on a pilot batch; "ode": the probability-flow ODE likelihood,
    # dequantized. All but "elbo" need a continuous-time model.
    config.eval.method = "elbo"
    config.eval.num_time_samples = 1  # Network evaluations per image of the ELBO methods.
    config.eval.proposal_bins = 32  # "elbo_importance" only: equal time bins of its q(t).
    config.eval.ode_rtol = 1e-5
    config.eval.ode_atol = 1e-5
    config.eval.ode_divergence = "hutchinson"  # "exact" only for small images.
    config.eval.ode_dequant_samples = 1
    # "uniform": dequantize x + U[0, 1) (comparable with flows and score-SDE papers);
    # "truncated_normal": the bin's noise from a normal truncated to the bin (i-DODE);
    # "decoder": z_0 ~ q(z_0 | x) and the ELBO's decoder (comparable with the ELBO).
    config.eval.ode_dequantization = "uniform"
    # True: bpd is -log2 of the mean likelihood ratio over the ode_dequant_samples draws (a
    # tighter bound, as MuLAN reports with 20 draws; needs ode_divergence "exact"); False:
    # the mean of the per-draw bounds.
    config.eval.ode_importance_weighted = False

    config.sample = ml_collections.ConfigDict()
    config.sample.num_samples = 64
    config.sample.batch_size = 64
    config.sample.num_steps = 1000
    # "ancestral", "ddim" or "dpm_solver_2m" (ODE, 2nd order) on the grid of num_steps steps;
    # "ode": the probability-flow ODE solved adaptively to ode_tolerance.
    config.sample.sampler = "ancestral"
    config.sample.decode = "argmax"
    config.sample.ode_tolerance = 1e-5  # rtol = atol of the adaptive sampler "ode".

    config.sharding = ml_collections.ConfigDict()
    config.sharding.fsdp = 1
    config.sharding.min_shard_bytes = 1 << 16
    return config
