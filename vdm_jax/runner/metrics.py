"""Scalars and images to the console and to TensorBoard event files.

:class:`MetricWriter` logs scalars with absl logging and, on process 0 only, writes them and
images to ``{workdir}/tensorboard`` with tensorboardX (no TensorFlow needed). Names carry
their group, ``train/bpd``, ``eval/bpd``, ``samples``. Each evaluation protocol writes to a
run of its own, ``{workdir}/tensorboard/eval/{protocol_id}``
(:mod:`vdm_jax.runner.results`), so figures of different estimators are never one curve.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging


class MetricWriter:
    """Writes scalars and images; only the chief process (index 0) touches files."""

    def __init__(self, workdir: str, *, run: str = "", enabled: bool | None = None):
        """Writes to the event files of ``workdir`` (appending to those of earlier runs).

        Args:
          workdir: the run's directory; events go to ``{workdir}/tensorboard/{run}``.
          run: a TensorBoard run below the workdir's (``""``: the training run).
          enabled: write files and console lines; default: this is process 0.
        """
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._directory = os.path.join(workdir, "tensorboard", run)
        self._writer: Any = None

    def _events(self) -> Any:
        """The event-file writer, opened at the first write (a run that writes nothing
        leaves no file)."""
        if self._writer is None:
            from tensorboardX import SummaryWriter  # Imported here: process 0 only.

            self._writer = SummaryWriter(self._directory)
        return self._writer

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Logs ``{name: value}`` at ``step`` to the console and TensorBoard."""
        if not self.enabled:
            return
        logging.info(
            "[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items()))
        )
        events = self._events()
        for name, value in scalars.items():
            events.add_scalar(name, float(value), step)
        events.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Writes ``{name: uint8 [H, W, C]}`` images (C = 1 or 3) at ``step`` to TensorBoard."""
        if not self.enabled:
            return
        for name, image in images.items():
            image = np.asarray(image)
            if image.shape[-1] == 1:
                image = np.repeat(image, 3, axis=-1)
            self._events().add_image(name, image, step, dataformats="HWC")
        self._events().flush()

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """Writes ``{name: markdown text}`` at ``step`` to TensorBoard's text dashboard."""
        if not self.enabled:
            return
        for name, text in texts.items():
            self._events().add_text(name, text, step)
        self._events().flush()

    def close(self) -> None:
        """Flushes and closes the event files."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
