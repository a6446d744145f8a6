"""vdm_jax: Variational Diffusion Models with a learned noise schedule, in JAX/Flax.

The package is the math, as pure functions and the Flax modules that hold parameters:
``schedules`` (gamma(t)), ``diffusion`` (the negative-ELBO terms), ``model`` (the VDM
module and its training gradients), ``parameterizations``, ``weightings``, ``latents``,
``elbo_estimators``, ``ode_likelihood``, ``samplers`` and ``unet`` (the score network).
:mod:`vdm_jax.runner` composes them into experiments; nothing here imports it.
"""

__version__ = "0.1.0"
