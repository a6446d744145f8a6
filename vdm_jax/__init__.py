"""vdm_jax: Variational Diffusion Models with a learned noise schedule, in JAX/Flax.

Modules: ``schedules`` (gamma(t)), ``diffusion`` (the negative-ELBO terms as pure
functions), ``model`` (the VDM module and its training gradients), ``unet`` (the score
network), ``samplers``, ``data`` (datasets by name) and the experiment runner.
"""

__version__ = "0.1.0"
