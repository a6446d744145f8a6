"""Test setup: eight simulated CPU devices, set before JAX initialises its backend.

The tests' programs are tiny and compiled once or twice each, so compilation, not running,
is most of their time: LLVM's optimisation level 0 compiles several times faster (the fast
tier runs in about 0.75 of the time; every closed-form tolerance holds).
"""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
