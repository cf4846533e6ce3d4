"""The divergence guard: a run whose loss blows up stops at once and is marked diverged.

With f_k the minibatch training loss at step k and f_0 the first one, the run
stops at the first step where f_k is not finite or f_k > ``max_factor`` · f_0. The lecture's
bound says why a stepsize sweep must expect this: SG usually diverges when α is above
2μ/(L M_G), and a grid over α straddles that threshold on purpose. :class:`DivergenceGuard`
raises :class:`Diverged` from ``on_train_batch_end`` (before any checkpoint of that step is
written); ``fit.py`` ends the MLflow run FAILED with tags ``rescalelab.status=diverged``,
``rescalelab.diverged_step`` and ``rescalelab.diverged_loss``, and the job returns +inf so
that the rest of a sweep goes on and a minimizing sweeper ranks it last. f_0 is saved in the
checkpoint, so a resumed run compares with the same f_0.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from rescalelab.errors import Expect, at_least, checked, required


class Diverged(Exception):
    """Training diverged at ``step`` (the step axis of the metric histories) with ``loss``."""

    def __init__(self, step: int, loss: float, reason: str) -> None:
        super().__init__(f"training diverged at step {step}: loss={loss:g} ({reason})")
        self.step, self.loss, self.reason = step, loss, reason


def _step(trainer: pl.Trainer) -> int:
    # Inside on_train_batch_end the optimizer has stepped: the batch's index on the step axis
    # of the metric histories is global_step - 1.
    return max(trainer.global_step - 1, 0)


@checked(
    "callbacks.guard",
    max_factor=Expect(float, lambda v: v > 1, "a number > 1 or null"),
    check_every_n_steps=required(at_least(1)),
)
class DivergenceGuard(Callback):
    """Stop at the first step with a non-finite loss or a loss above ``max_factor`` · f_0.

    ``max_factor`` > 1, or ``null``: only the non-finite test. ``check_every_n_steps`` > 1
    reads the losses back from the device once per that many steps (fewer synchronizations on
    a GPU); the step reported is still the first bad one.
    """

    def __init__(self, max_factor: float | None = 10.0, check_every_n_steps: int = 1) -> None:
        self.max_factor, self.every = max_factor, check_every_n_steps
        self.initial_loss: float | None = None
        self._seen: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        if self.every == 1 and trainer.world_size == 1:
            # The common case reads the one loss back at once: stacking a one-element list
            # and reducing it cost more than the step's check itself on a CPU.
            self._judge([_step(trainer)], [loss.detach().float().item()])
            return
        self._seen.append((_step(trainer), loss.detach().float().reshape(())))
        if self.initial_loss is None or len(self._seen) >= self.every:
            self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        steps = [s for s, _ in self._seen]
        values = torch.stack([v for _, v in self._seen])
        self._seen.clear()
        if trainer.world_size > 1:
            # Every rank decides alike (a rank that stopped alone would hang the others): the
            # worst loss over the ranks, NaN counted as +inf.
            values = trainer.strategy.reduce(
                torch.nan_to_num(values, nan=math.inf), reduce_op="max"
            )
        self._judge(steps, values.cpu().tolist())

    def _judge(self, steps: list[int], losses: list[float]) -> None:
        for step, loss in zip(steps, losses):
            if not math.isfinite(loss):
                raise Diverged(step, loss, "non-finite loss")
            if self.initial_loss is None:
                self.initial_loss = loss
            elif (
                self.max_factor is not None
                and self.initial_loss > 0
                and loss > self.max_factor * self.initial_loss
            ):
                raise Diverged(
                    step, loss, f"loss > {self.max_factor:g} x initial loss {self.initial_loss:.4g}"
                )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._seen:
            self._check(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._seen:  # never checkpoint a state that has not been checked
            self._check(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"initial_loss": self.initial_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_loss = state_dict.get("initial_loss")
