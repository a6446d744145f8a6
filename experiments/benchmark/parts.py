"""The benchmarked parts: one builder per part, each giving a compiled :class:`harness.Part`.

:data:`PARTS` maps a part's name to its builder ``(exp, batch_size, options, context) ->
Part``, in the order a timing round calls them; :func:`benchmark_point` builds and times the
selected ones at one batch size. Every part runs the runner's own jitted program (or, for
the ``conv_stack`` baseline, a plain conv stack) on a fixed random batch: data loading is
not timed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from experiments.benchmark import harness
from vdm_jax import schedules
from vdm_jax.runner import evaluate, flops, sampling, sharding, specs, state, train
from vdm_jax.runner.experiment import Experiment

if TYPE_CHECKING:  # options.py reads PARTS from here.
    from experiments.benchmark.options import Options

# The part whose FLOP rate the others' are taken relative to.
BASELINE = "conv_stack"


@dataclasses.dataclass
class Context:
    """What the parts share on one mesh, across batch sizes.

    Attributes:
      train_state: the live train state. The train part donates it at each call and stores
        the new one here; eval and sample read its EMA parameters at each call.
      key: a PRNG key, replicated over the mesh.
    """

    train_state: state.TrainState
    key: jax.Array

    @classmethod
    def create(cls, exp: Experiment) -> Context:
        """A fresh train state and the experiment's seed key, on its mesh."""
        key = jax.device_put(jax.random.PRNGKey(exp.seed), sharding.replicated(exp.mesh))
        return cls(state.create_train_state(exp), key)


PartBuilder = Callable[[Experiment, int, "Options", Context], harness.Part]


@dataclasses.dataclass(frozen=True)
class EvalDetails:
    """The eval part's own result fields."""

    eval_method: str
    network_evals_per_image: int | None  # None when adaptive (the probability-flow ODE).


@dataclasses.dataclass(frozen=True)
class SampleDetails:
    """The sample part's own result fields."""

    sample_steps_per_call: int


@dataclasses.dataclass(frozen=True)
class ConvStackDetails:
    """The conv stack's own result fields: 3x3 convs, their channels and compute dtype."""

    depth: int
    width: int
    dtype: str


def _local_rows(batch_size: int) -> int:
    """This process's rows of a global batch of ``batch_size``."""
    return batch_size // jax.process_count()


def random_batch(exp: Experiment, batch_size: int, *, train: bool) -> dict[str, jax.Array]:
    """A fixed batch of random integer images (and labels), sharded as the runner does.

    Args:
      exp: the experiment (its dataset's shape, K and classes, its conditioning and mesh).
      batch_size: global; each process makes its own ``batch_size / process_count`` rows.
      train: a training batch (else an eval batch: the conditioning's eval labels).

    Returns:
      ``{"image": int32 [B, H, W, C], "label": int32 [B] (if conditioned)}``.
    """
    rows = _local_rows(batch_size)
    rng = np.random.default_rng([exp.seed, jax.process_index()])
    raw = {
        "image": rng.integers(0, exp.info.vocab_size, (rows, *exp.info.shape), dtype=np.int32),
        "label": rng.integers(0, max(exp.info.num_classes, 1), (rows,), dtype=np.int32),
    }
    return sharding.global_batch(exp.conditioning.model_batch(raw, train=train), exp.mesh)


def abstract_batch(exp: Experiment, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and shardings of a training batch of ``batch_size``, to compile without data."""
    spec = sharding.batch_sharding(exp.mesh)
    image = jax.ShapeDtypeStruct((batch_size, *exp.info.shape), jnp.int32, sharding=spec)
    batch = {"image": image}
    if exp.conditioning.conditional:
        batch["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=spec)
    return batch


def forward_flops(exp: Experiment, batch_size: int) -> int:
    """Conv and matmul FLOPs of one forward pass of the score network (of every member of an
    ensemble) on the batch."""
    one = flops.unet_forward_flops(exp.vdm.score_net, batch_size, exp.info.shape)
    return exp.vdm.ensemble_size * one


def conv_stack_step(mesh: Mesh, dtype: Any) -> Any:
    """A jitted SGD step of a plain stack of 3x3 convs: ``(kernels, x) -> kernels``.

    The loss is ``mean(stack(x)^2)``; kernels [3, 3, C, C] (float32, cast to ``dtype`` like
    Flax's ``Conv``) are replicated and donated, ``x`` [B, H, W, C] is sharded over the batch.
    """

    def loss(kernels: list[jax.Array], x: jax.Array) -> jax.Array:
        h = x.astype(dtype)
        for k in kernels:
            h = jax.lax.conv_general_dilated(
                h, k.astype(dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return jnp.mean(jnp.square(h.astype(jnp.float32)))

    def step(kernels: list[jax.Array], x: jax.Array) -> list[jax.Array]:
        grads = jax.grad(loss)(kernels, x)
        return jax.tree.map(lambda k, g: k - 1e-3 * g, kernels, grads)

    replicated = sharding.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=replicated,
        donate_argnums=0,
    )


def conv_stack_depth(exp: Experiment, batch_size: int, requested: int) -> int:
    """``requested``, or the number of width->width 3x3 convs with the model's conv FLOPs."""
    if requested > 0:
        return requested
    layers = flops.equivalent_conv_layers(exp.vdm.score_net, batch_size, exp.info.shape)
    return max(1, round(exp.vdm.ensemble_size * layers))


def _prepare(
    name: str,
    exp: Experiment,
    batch_size: int,
    jitted: Any,
    args: tuple[Any, ...],
    *,
    run: harness.Runner,
    analytic_flops: float,
    calls_per_step: int = 1,
    details: Any = None,
) -> harness.Part:
    """:func:`harness.prepare` on the experiment's mesh, a call processing the batch."""
    return harness.prepare(
        name,
        jitted,
        args,
        run=run,
        images_per_call=batch_size,
        calls_per_step=calls_per_step,
        analytic_flops=analytic_flops,
        num_devices=exp.mesh.size,
        count_jaxpr_flops=flops.jaxpr_flops,
        details=details,
    )


def train_part(
    exp: Experiment, batch_size: int, options: Options, context: Context
) -> harness.Part:
    """The runner's train step (batch sharded, state in its layout and donated)."""
    del options
    batch = random_batch(exp, batch_size, train=True)

    def run(compiled: Any) -> Callable[[], Any]:
        def call() -> Any:
            context.train_state, metrics = compiled(context.train_state, batch)
            return context.train_state, metrics

        return call

    return _prepare(
        "train",
        exp,
        batch_size,
        train.make_train_step(exp),
        (context.train_state, batch),
        run=run,
        analytic_flops=flops.TRAIN_FLOPS_PER_FORWARD * forward_flops(exp, batch_size),
    )


def scalar_schedule(exp: Experiment) -> Experiment:
    """The experiment with the base config's scalar schedule in place of its own
    (``monotone_net``, no auxiliary latent, interior on the variance): the same network,
    data and optimiser, so that its train step is the baseline of a per-dimension one."""
    spec = dataclasses.replace(
        exp.model, schedule="monotone_net", schedule_grad="variance", latent_dim=0
    )
    kind = schedules.SCHEDULES["monotone_net"]
    settings = kind.settings.from_section(dataclasses.asdict(spec))
    loss = dataclasses.replace(
        exp.loss,
        schedule_grad="variance",
        variance_params=kind.variance_params,
        per_dimension=kind.per_dimension,
    )
    vdm = spec.build(kind.build(settings), exp.num_classes, exp.info.vocab_size)
    return exp.replace(model=spec, schedule=kind, schedule_settings=settings, vdm=vdm, loss=loss)


def train_scalar_part(
    exp: Experiment, batch_size: int, options: Options, context: Context
) -> harness.Part:
    """The train step of :func:`scalar_schedule` (its own train state), timed in the same
    rounds as ``train``: their ratio is a per-dimension schedule's cost."""
    scalar = scalar_schedule(exp)
    scalar_context = Context.create(scalar)
    part = train_part(scalar, batch_size, options, scalar_context)
    return dataclasses.replace(part, name="train_scalar")


def eval_part(exp: Experiment, batch_size: int, options: Options, context: Context) -> harness.Part:
    """The runner's per-batch eval program (``eval.method``) on the EMA parameters.

    A method with a ``prepare`` step (the importance pilot) runs it once, untimed.
    """
    del options
    evaluator = evaluate.Evaluator(exp)
    batch = random_batch(exp, batch_size, train=False)
    local_mask = {"mask": np.ones(_local_rows(batch_size), bool)}  # Every row is real.
    mask = sharding.global_batch(local_mask, exp.mesh)["mask"]
    params = context.train_state.ema_params
    prepared = None
    if evaluator.prepare is not None:
        prepared = evaluator.prepare(params, batch, context.key)
    evals = exp.eval_settings.network_evals_per_image()

    def run(compiled: Any) -> Callable[[], Any]:
        def call() -> Any:
            ema_params = context.train_state.ema_params
            return compiled(ema_params, batch, mask, context.key, prepared)

        return call

    return _prepare(
        "eval",
        exp,
        batch_size,
        evaluator.step,
        (params, batch, mask, context.key, prepared),
        run=run,
        analytic_flops=evals * forward_flops(exp, batch_size) if evals else 0.0,
        details=EvalDetails(exp.eval.method, evals),
    )


def sample_part(
    exp: Experiment, batch_size: int, options: Options, context: Context
) -> harness.Part:
    """The runner's sampler for ``options.sample_steps`` steps; figures are per step."""
    steps = options.sample_steps
    spec = dataclasses.replace(exp.sample, batch_size=batch_size, num_steps=steps)
    sample_fn = sampling.make_sample_fn(exp.replace(sample=spec))

    def run(compiled: Any) -> Callable[[], Any]:
        return lambda: compiled(context.train_state.ema_params, context.key)

    return _prepare(
        "sample",
        exp,
        batch_size,
        sample_fn,
        (context.train_state.ema_params, context.key),
        run=run,
        analytic_flops=steps * forward_flops(exp, batch_size),
        calls_per_step=steps,
        details=SampleDetails(steps),
    )


def _conv_stack_inputs(
    exp: Experiment, batch_size: int, depth: int
) -> tuple[list[jax.Array], jax.Array]:
    """``depth`` replicated kernels [3, 3, C, C] and a sharded input [B, H, W, C]."""
    h, w, _ = exp.info.shape
    width = exp.model.channels
    rng = np.random.default_rng(exp.seed)
    scale = 1.0 / math.sqrt(9 * width)  # Variance preserving: activations stay O(1).
    replicated = sharding.replicated(exp.mesh)
    kernels = [
        jax.device_put(
            (scale * rng.standard_normal((3, 3, width, width))).astype(np.float32), replicated
        )
        for _ in range(depth)
    ]
    local_x = rng.standard_normal((_local_rows(batch_size), h, w, width)).astype(np.float32)
    return kernels, sharding.global_batch({"x": local_x}, exp.mesh)["x"]


def conv_stack_part(
    exp: Experiment, batch_size: int, options: Options, context: Context
) -> harness.Part:
    """A plain stack of 3x3 convs at the model's width, resolution, batch and compute dtype:
    forward + backward + SGD update (kernels donated), with the same shardings.

    Its depth matches the model's conv FLOPs unless ``options.conv_stack_depth`` says
    otherwise.
    """
    del context
    depth = conv_stack_depth(exp, batch_size, options.conv_stack_depth)
    kernels, x = _conv_stack_inputs(exp, batch_size, depth)
    h, w, _ = exp.info.shape
    width = exp.model.channels
    layer_flops = flops.conv3x3_flops(batch_size, h, w, width, width)

    def run(compiled: Any) -> Callable[[], Any]:
        def call() -> Any:
            nonlocal kernels
            kernels = compiled(kernels, x)
            return kernels

        return call

    return _prepare(
        BASELINE,
        exp,
        batch_size,
        conv_stack_step(exp.mesh, specs.DTYPES[exp.model.dtype]),
        (kernels, x),
        run=run,
        analytic_flops=flops.TRAIN_FLOPS_PER_FORWARD * depth * layer_flops,
        details=ConvStackDetails(depth, width, exp.model.dtype),
    )


# Each part's builder, in the order a timing round calls them.
PARTS: dict[str, PartBuilder] = {
    "train": train_part,
    "train_scalar": train_scalar_part,
    "eval": eval_part,
    "sample": sample_part,
    BASELINE: conv_stack_part,
}


# Parts measured unless ``--parts`` names others: ``train_scalar`` only when asked for.
DEFAULT_PARTS = tuple(name for name in PARTS if name != "train_scalar")


def benchmark_point(
    exp: Experiment,
    options: Options,
    context: Context,
    probe: harness.MemoryProbe,
    placement: harness.Placement,
) -> list[harness.PartResult]:
    """Builds the selected parts at ``placement.batch_size`` and times them round-robin.

    Args:
      exp: the experiment, its batch sizes set to ``placement.batch_size``.
      options: which parts, steps, warm-up, profiling.
      context: the mesh's shared state (its train state is advanced by the train part).
      probe: measures peak memory.
      placement: batch size and devices.
    """
    batch_size = placement.batch_size
    parts = [
        build(exp, batch_size, options, context)
        for name, build in PARTS.items()
        if name in options.parts
    ]
    timings = harness.time_parts(
        parts,
        steps=options.steps,
        warmup=options.warmup,
        probe=probe,
        profile_dir=options.profile_dir,
    )
    return harness.results(parts, timings, placement, baseline=BASELINE)
