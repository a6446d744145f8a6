"""The experiment runner: configs in, trained, evaluated and sampled workdirs out.

It composes the pure math of :mod:`vdm_jax` (which never imports this package) from one
``ml_collections`` config: ``config_validation`` and ``specs`` turn the config into a typed
:class:`~vdm_jax.runner.experiment.Experiment` (``experiment.build``); ``data`` and
``conditioning`` read the data; ``sharding``, ``state`` and ``ensemble`` place the train
state on the devices; ``train``, ``evaluate`` and ``sampling`` are the three modes, with
``checkpoint``, ``workdir``, ``preemption``, ``metrics`` and ``outputs`` under them.
"""
