"""Per-dimension and input-adaptive noise schedules (MuLAN) on the embedded digits.

The second digits default (``configs/digits.py:v2``: eps prediction, uniform training times)
with its scalar schedule replaced; the same network, optimiser and 4,500 steps, so the
README's table compares schedules at one budget.
Pick the variant after a colon::

  python -m experiments.main --config=configs/digits_mulan.py:adaptive \\
      --workdir=workdir/digits_adaptive --mode=train

Variants:
  per_dim: one gamma per pixel (``per_dim_monotone``: learned per-pixel endpoints, our
    monotone interior), the same for every input.
  per_dim_polynomial: the same with MuLAN's polynomial interior.
  adaptive: MuLAN: the polynomial per-pixel schedule conditioned on an auxiliary latent
    c ~ q(c | x) of 16 dimensions, whose KL joins the bound (``bpd_latent``).
  adaptive_monotone: the same with our monotone interior.

Every variant trains each pixel's path (endpoints and interior) on the ELBO, since a
per-dimension schedule's interior changes the bound, and the shared time warp, the speed
along the paths, on the variance of the loss estimate (``schedule_grad="variance"``).
"""

from __future__ import annotations

import ml_collections

from configs import digits

VARIANTS = {
    "per_dim": ("per_dim_monotone", 0),
    "per_dim_polynomial": ("per_dim_polynomial", 0),
    "adaptive": ("per_dim_polynomial", 16),
    "adaptive_monotone": ("per_dim_monotone", 16),
}


def get_config(variant: str = "adaptive") -> ml_collections.ConfigDict:
    """The second digits default (``configs/digits.py:v2``) with the ``variant``'s schedule (a
    key of :data:`VARIANTS`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {sorted(VARIANTS)}")
    schedule, latent_dim = VARIANTS[variant]
    config = digits.get_config("v2")
    config.model.schedule = schedule
    config.model.schedule_width = 16  # The monotone interior's basis, per pixel.
    config.model.schedule_grad = "variance"  # The time warp on the variance, paths on the ELBO.
    config.model.latent_dim = latent_dim
    return config
