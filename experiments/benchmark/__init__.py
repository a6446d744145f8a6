r"""Benchmark: speed, FLOP rate and memory of the training, eval and sampler steps.

  python -m experiments.benchmark --config=configs/cifar10.py --batch_sizes=4 --steps=5 \
      --json=/tmp/bench.json

On whatever devices JAX sees (CPU here, GPU/TPU elsewhere) it measures, for each batch size
of ``--batch_sizes`` and each device count of ``--device_counts``, the experiment
(``vdm_jax.runner.experiment.build``) with that batch size for training, eval and sampling:

* ``train``: the runner's own jitted step (``train.make_train_step``: batch sharded, state
  in the layout ``config.sharding`` sets, donated), on a fixed random batch (data loading
  is not timed);
* ``eval``: the runner's per-batch eval program (``evaluate.Evaluator(exp).step``, as
  ``config.eval`` sets it: by default the ELBO with ``eval.num_time_samples`` network
  evaluations per image) on the EMA parameters; a method's ``prepare`` step (the importance
  pilot) runs once, untimed;
* ``sample``: the runner's sampler (``sampling.make_sample_fn``) run for ``--sample_steps``
  steps; the figures are per sampler step;
* ``conv_stack``: a plain stack of 3x3 convolutions at the model's width, resolution, batch
  and compute dtype, forward + backward + SGD update (kernels donated), jitted with the same
  shardings, timed the same way in the same process. Its depth matches the model's conv
  FLOPs unless ``--conv_stack_depth`` says otherwise.

For each: compile time (trace + lower + compile); seconds per step over ``--steps`` timed
steps after ``--warmup`` untimed ones: median, quartiles, min and max; images per second (at
the median); FLOPs per step and achieved FLOP/s; peak memory; and XLA's memory estimate of
the compiled program (``compiled.memory_analysis()``). The parts' timed steps run
round-robin (train, eval, sample, conv stack, train, ...), each waited for with
``jax.block_until_ready`` before the clock stops, so that a change in the machine's load
during the run affects every part alike and their FLOP-rate ratio stays fair.

FLOPs (``vdm_jax.runner.flops``): ``analytic`` is the closed-form count of the network's
convolutions and matrix products (3x the forward for a training step), ``jaxpr`` the same
operations counted in the traced program (a check on ``analytic``; it also counts
rematerialised forwards), ``xla`` XLA's ``cost_analysis()`` of the compiled program (all
operations, summed over devices; a loop body counts once). ``ratio_vs_conv_stack`` divides
the part's analytic FLOP/s by the conv stack's analytic FLOP/s in the same round, median over
rounds (quartiles in ``ratio_vs_conv_stack_quartiles``): the fraction of a plain conv
stack's speed the model reaches, comparable across machines.

Peak memory is the device's ``peak_bytes_in_use`` where the backend reports it (a high-water
mark over the process's life), else the process's peak resident set size over the part's
warm-up steps, reset before them (Linux ``/proc/self/clear_refs``); ``start_bytes`` is the
resident size when they began (the process's baseline and every part's buffers).
``process_cpu_per_wall`` is this process's CPU seconds (all threads) per wall second while
stepping: near the core count when the benchmark had a CPU host to itself, lower when other
processes competed (the 1-minute load average at start and end is in ``environment``).

Device counts: on CPU, each count other than the number of devices this process sees runs in
a child process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, so that
every measurement sees exactly the devices it uses, as a training run would. (A sub-mesh of
a process with more simulated devices would share the process's thread pools with idle
devices.) On GPU/TPU the counts are sub-meshes of the real devices. ``--device_count_mode``
overrides the choice.

``--memory_only`` compiles the training step on abstract inputs (``jax.ShapeDtypeStruct``,
nothing allocated) and reports XLA's memory estimate and FLOP counts only, e.g. for the
ImageNet 64x64 model at batch 64::

  python -m experiments.benchmark --config=configs/imagenet64.py --batch_sizes=64 \
      --memory_only --json=/tmp/imagenet64_memory.json

Run it on the backend whose memory matters: XLA:CPU's estimate does not shrink with
``model.remat`` or ``model.dtype=bfloat16`` (its scheduler keeps rematerialised activations
live, and it computes bfloat16 in float32), while GPU and TPU compilers do. Next to it,
``residual_estimate_per_device`` ("est MiB") is backend-independent: the device's part of
the train state, the whole parameters a split state gathers, one copy of the gradients, and
the activations the backward pass keeps (the residuals of ``jax.vjp``, read off the traced
program, which ``remat`` and ``bfloat16`` do shrink). It is reported for the run's layout
and, under ``residual_estimate_per_device_by_layout`` ("split est MiB" in the table), for the
state replicated and split over every device (``sharding.fsdp=-1``); ``state_bytes_per_device``
is the run's. ``--fit_device_bytes=80e9`` adds, per layout, the widest U-Net
(``model.channels``, the config's depth, batch, dtype and remat) whose estimate fits 80 GB
per device::

  python -m experiments.benchmark --config=configs/imagenet64.py --batch_sizes=64 \
      --device_counts=8 --memory_only --fit_device_bytes=80e9 --json=/tmp/imagenet64_fit.json

Modules: ``harness`` (model-agnostic compiling, timing, memory probes and the ratio to a
baseline part), ``parts`` (one builder per part, :data:`parts.PARTS`), ``memory`` (the
``--memory_only`` point and saved activations), ``sweep`` (batch sizes, device counts, child
processes, environment), ``options``, ``report`` (JSON layout, table) and ``__main__`` (flags).
"""
