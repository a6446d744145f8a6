"""FLOP counts of the score network, for the benchmark's achieved FLOP/s.

Two independent counts of the same thing, the multiply-adds of convolutions and matrix
products (2 FLOPs each); elementwise work (GroupNorm, swish, softmax, the optimizer) is not
counted, so a step's "achieved FLOP/s" measures how much of its time does useful math:

* :func:`unet_forward_flops`: closed form from the architecture of :class:`ScoreUNet`
  (``2 H W C_in C_out 9`` per 3x3 conv, ``2 H W C_in C_out`` per 1x1 projection,
  ``2 T C (3C) + 4 T^2 C + 2 T C^2`` per attention block over ``T = H W`` positions, the
  conditioning MLP). A training step costs ``3x`` the forward: the forward, the gradient
  with respect to each layer's input and with respect to its weights (the input gradient is
  needed everywhere: the schedule's gradient flows through ``z_t`` into the first conv).
* :func:`jaxpr_flops`: walks a traced program (forward or whole training step) and adds
  ``2 * prod(out) * (contraction size)`` over every ``conv_general_dilated`` and
  ``dot_general``; it counts what the program executes, so rematerialised forwards count
  again, and loops count once per iteration.

XLA's own ``compiled.cost_analysis()["flops"]`` is a third count (all ops, after
optimisation); the benchmark reports it next to these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
from jax.extend import core as jex_core

from vdm_jax import unet

# A training step's matmul/conv FLOPs per forward's: forward, input gradient, weight gradient.
TRAIN_FLOPS_PER_FORWARD = 3


def conv3x3_flops(batch: int, height: int, width: int, c_in: int, c_out: int) -> int:
    """Multiply-add FLOPs of one 3x3 'SAME' convolution, stride 1 (padding taps included)."""
    return 2 * batch * height * width * c_in * c_out * 9


def unet_forward_flops(net: unet.ScoreUNet, batch: int, shape: tuple[int, int, int]) -> int:
    """Conv and matmul FLOPs of one forward pass of ``net`` on ``batch`` images of ``shape``.

    Args:
      net: the score network (its ``num_blocks``, ``channels``, ``attention``, Fourier
        features, labels, ``label_input`` and ``outputs_per_channel`` matter; dtype and
        remat do not).
      batch: number of images.
      shape: (H, W, C) of one image.

    Returns:
      FLOPs (2 per multiply-add) of the convolutions, dense layers and attention products.
    """
    h, w, c = shape
    hw, width, emb = h * w, net.channels, 4 * net.channels

    def dense(rows: int, c_in: int, c_out: int) -> int:
        return 2 * rows * c_in * c_out

    num_freqs = net.fourier_max_exp - net.fourier_min_exp + 1
    c_input = c * (1 + 2 * num_freqs) if net.fourier_features else c  # z and sin, cos
    # Conditioning MLP (per image).
    cond_in = width + (1 if net.label_input == "flag" else 0)
    total = dense(batch, cond_in, emb) + dense(batch, emb, emb)
    total += conv3x3_flops(batch, h, w, c_input, width)  # conv_in

    def res_block(c_in: int) -> int:
        flops = conv3x3_flops(batch, h, w, c_in, width) + conv3x3_flops(batch, h, w, width, width)
        flops += dense(batch, emb, width)  # cond_proj
        if c_in != width:
            flops += dense(batch * hw, c_in, width)  # skip_proj
        return flops

    attn = (
        dense(batch * hw, width, 3 * width)  # qkv
        + 2 * 2 * batch * hw * hw * width  # q k^T and weights v
        + dense(batch * hw, width, width)  # proj_out
    )
    num_attn = 1 + (2 * net.num_blocks + 1 if net.attention == "all" else 0)
    total += net.num_blocks * res_block(width)  # down
    total += 2 * res_block(width)  # middle
    total += (net.num_blocks + 1) * res_block(2 * width)  # up, on concat(h, skip)
    total += num_attn * attn
    total += conv3x3_flops(batch, h, w, width, c * net.outputs_per_channel)  # conv_out
    return total


def equivalent_conv_layers(net: unet.ScoreUNet, batch: int, shape: tuple[int, int, int]) -> float:
    """The forward FLOPs of ``net`` in units of one ``channels -> channels`` 3x3 conv."""
    h, w, _ = shape
    return unet_forward_flops(net, batch, shape) / conv3x3_flops(
        batch, h, w, net.channels, net.channels
    )


def _eqn_flops(eqn: Any) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        lhs = eqn.invars[0].aval.shape
        (contract, _), _ = eqn.params["dimension_numbers"]
        out = eqn.outvars[0].aval.shape
        return 2 * math.prod(out) * math.prod(lhs[d] for d in contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        dn = eqn.params["dimension_numbers"]
        out = eqn.outvars[0].aval.shape
        # Each output element sums over the kernel's window and its input features.
        return 2 * math.prod(out) * math.prod(rhs) // rhs[dn.rhs_spec[0]]
    return 0


def _sub_jaxprs(value: Any) -> Iterable[Any]:
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr: Any) -> int:
    """Conv and matmul FLOPs a (closed) jaxpr executes, sub-programs included.

    ``scan`` bodies count ``length`` times, ``cond`` the most expensive branch, ``while``
    bodies once (their trip count is not static).
    """
    if isinstance(jaxpr, jex_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        name = eqn.primitive.name
        if name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
            continue
        sub = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
        if name == "scan":
            sub *= eqn.params["length"]
        total += sub
    return total


def traced_flops(fn: Any, *args: Any) -> int:
    """:func:`jaxpr_flops` of ``fn(*args)`` (arrays or ``jax.ShapeDtypeStruct`` s)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))
