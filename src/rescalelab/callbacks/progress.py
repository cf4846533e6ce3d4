"""The progress bar: Lightning's Rich bar with its per-batch bookkeeping paced by the clock.

Lightning's ``RichProgressBar`` rebuilds the metrics dict and updates its task on *every*
training batch (Python work every step), although the terminal is redrawn only ``refresh_rate``
times a second. On a small CPU step that is a visible share of the step, spent on nothing
anyone sees. :class:`ProgressBar` does that bookkeeping at most ``refresh_rate`` times a second
and on the last batch of every epoch, so the bar reads the same.
"""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

from rescalelab.errors import at_least, checked


@checked("callbacks.progress", refresh_rate=at_least(0))
class ProgressBar(RichProgressBar):
    """``RichProgressBar`` (same arguments) updated at most ``refresh_rate`` times a second
    (0: Lightning's "no bar")."""

    def __init__(self, refresh_rate: int = 5, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self._next_update = 0.0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if self.is_disabled:
            return
        now = time.monotonic()
        if now >= self._next_update or batch_idx + 1 >= self.total_train_batches:
            self._next_update = now + 1.0 / self.refresh_rate
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
