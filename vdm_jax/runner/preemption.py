"""SIGTERM as the training loop sees it: at step boundaries, between evaluation batches and
sampler calls, and while the first step compiles.

Single-process runs install a handler that sets a flag; the loop saves at the next step
boundary and returns, evaluation and sampling stop between batches (:class:`Interrupted`),
and a compilation (the training step's, and the first evaluation batch's and sampler call's)
runs in a worker thread so that a signal during it is seen at once.
Multi-process runs leave SIGTERM to JAX's preemption service, which agrees on one step for
all hosts (:meth:`Preemption.at_step`); the checks between batches are then off, since the
hosts must agree on where to stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
from absl import logging
from jax.experimental import multihost_utils

_T = TypeVar("_T")
# How often a wait for a worker thread looks at the flag, in seconds.
_POLL_SECONDS = 0.05
_WORKER_NAME = "vdm_jax-compile"


class Interrupted(Exception):
    """Work stopped early because the run is being preempted."""


class Preemption:
    """Whether the run was asked to stop (SIGTERM)."""

    def __init__(self) -> None:
        self._flag = threading.Event()

    def request(self) -> None:
        """Marks the run as preempted (the signal handler calls this)."""
        self._flag.set()

    def requested(self) -> bool:
        """Whether this process was signalled (always False with several processes)."""
        return self._flag.is_set()

    def at_step(self, step: int) -> bool:
        """Whether to stop after ``step``, agreed by every process."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested()

    def check(self) -> None:
        """Raises :class:`Interrupted` if preemption was requested."""
        if self.requested():
            raise Interrupted("preempted")

    def wait_for(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` in a worker thread, raising :class:`Interrupted` as soon as preempted.

        For work that holds the main thread for long without returning to Python (an XLA
        compilation): the main thread waits in short slices, so the signal handler runs.
        Interrupted work finishes in the background; its result is dropped.
        """
        if jax.process_count() > 1:
            return fn()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["value"] = fn()
            except BaseException as e:  # Re-raised in the main thread.
                result["error"] = e

        thread = threading.Thread(target=work, daemon=True, name=_WORKER_NAME)
        thread.start()
        while thread.is_alive():
            thread.join(_POLL_SECONDS)
            self.check()
        if "error" in result:
            raise result["error"]
        return result["value"]


def work_left_behind() -> bool:
    """Whether work that :meth:`Preemption.wait_for` abandoned still runs: the process must
    then end with ``os._exit`` (the interpreter's shutdown would abort inside XLA)."""
    return any(t.name == _WORKER_NAME and t.is_alive() for t in threading.enumerate())


@contextlib.contextmanager
def handle_sigterm() -> Iterator[Preemption]:
    """A :class:`Preemption` that SIGTERM requests while inside the context.

    Only a single process on its main thread installs the handler (elsewhere none can be, or
    JAX's preemption service owns the signal).
    """
    preemption = Preemption()
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield preemption
        return

    def handler(signum: int, frame: Any) -> None:
        del frame
        logging.warning("Received signal %d: stopping (saving if a new step finished).", signum)
        preemption.request()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield preemption
    finally:
        signal.signal(signal.SIGTERM, previous)
