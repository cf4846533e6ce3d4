"""The LightningModule: cross-entropy training of any model, with the norm plug wired in."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_only
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from rescalelab.geometry import LayerGeometry
from rescalelab.norm import NoNorm, NormPlug
from rescalelab.optim import Groups, build_optimizer, build_scheduler, observe_loss, param_groups

EPOCH_SUMS_KEY = "rescalelab.epoch_sums"


def cap_log_interval(trainer: pl.Trainer) -> None:
    """Cap ``trainer.log_every_n_steps`` at the epoch length (optimizer steps), saying so once.

    Step metrics are written every ``log_every_n_steps`` steps: above the epoch length an
    epoch may have no ``train/loss`` point at all (7 steps an epoch against the default 50).
    """
    batches = trainer.num_training_batches
    if not isinstance(batches, int) or batches < 1:
        return  # an iterable of unknown length: nothing to cap against
    per_epoch = max(1, batches // max(1, int(trainer.accumulate_grad_batches)))
    if trainer.log_every_n_steps > per_epoch:
        rank_zero_only(logging.getLogger("rescalelab").info)(
            f"trainer.log_every_n_steps={trainer.log_every_n_steps} exceeds the {per_epoch} "
            f"steps of an epoch: logging every {per_epoch} steps"
        )
        trainer.log_every_n_steps = per_epoch


class Classifier(pl.LightningModule):
    """Trains ``model`` on ``(x, y)`` batches with cross-entropy.

    Logs ``train/loss``, ``train/acc`` and ``train/lr`` every ``trainer.log_every_n_steps``
    optimizer steps (at Lightning's steps, written by :meth:`_log_step_metrics`) and ``val/loss``, ``val/acc`` per epoch. ``train/lr`` is the
    stepsize actually used at that step by the first parameter group (the base stepsize times
    its layer scale); ``train/lr/<group>`` is logged too when groups differ.

    The training curve of every run: ``train/loss_epoch`` and ``train/acc_epoch`` are the means
    over every step of the epoch, ``(1/N) Σ_k E_k`` of the minibatch losses (and accuracies) of
    its N steps, accumulated on the device (no host sync per step) and logged at the epoch's
    last step (the step of its last ``train/loss`` point), before validation and the epoch's
    checkpoint; under DDP the mean over replicas. The running sums go into checkpoints, so a
    run resumed mid-epoch logs the mean of the whole epoch, once. ``trainer.log_every_n_steps``
    is capped at the epoch length, so every epoch has at least one step-level point.

    The optimizer side arrives built, as partials (``instantiate(cfg.optim)`` …):
    ``optimizer(groups)``, ``scheduler(optimizer)``, ``groups(model, geometry)`` (default: one
    group per layer, one stepsize), and Lightning's ``lr_scheduler_config`` (``interval``,
    ``frequency``); :meth:`configure_optimizers` calls them, again whenever a norm plug
    rebuilds the optimizer (``norm=bn_warmup``).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Callable[[Groups], torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], Any],
        norm: NormPlug | None = None,
        geometry: dict[str, LayerGeometry] | None = None,
        groups: Callable[..., Groups] = param_groups,
        lr_scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.norm = norm or NoNorm()
        self.make_optimizer, self.make_scheduler, self.make_groups = optimizer, scheduler, groups
        self.lr_scheduler_config = dict(lr_scheduler_config or {})
        self.geometry = geometry
        self.val_acc: MulticlassAccuracy | None = None
        if num_classes >= 2:
            self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss = MeanMetric()
        # A DataModule with ``objective(outputs, y, model)`` (the convex problems) replaces
        # cross-entropy by its exact objective, regularizer included; accuracy is then not logged.
        self.objective: Any = None
        # Σ of the step losses (and accuracies) of this epoch so far, and their number of steps.
        self._epoch_sums: torch.Tensor | None = None
        self._epoch_steps = 0
        # (step, loss, accuracy, stepsizes) of the logging step in flight, written after it.
        self._step_metrics: tuple[int, torch.Tensor, torch.Tensor | None, dict] | None = None

    def setup(self, stage: str) -> None:
        self.objective = getattr(self.trainer.datamodule, "objective", None)

    def _loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.objective is not None:
            return self.objective(outputs, y, self.model)
        return F.cross_entropy(outputs, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.norm.on_train_batch_start(self.model, batch[0], self.global_step)

    def configure_callbacks(self) -> list[pl.Callback]:
        return self.norm.callbacks()  # norm=bn_warmup: the callback that switches to whitening

    def on_train_start(self) -> None:
        cap_log_interval(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.norm.on_save_checkpoint(checkpoint)
        sums = self._epoch_sums
        checkpoint[EPOCH_SUMS_KEY] = {
            "sums": None if sums is None else sums.detach().cpu(),
            "steps": self._epoch_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.norm.on_load_checkpoint(self, checkpoint)  # before the state dict is loaded
        state = checkpoint.get(EPOCH_SUMS_KEY) or {}
        self._epoch_sums, self._epoch_steps = state.get("sums"), int(state.get("steps", 0))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self._loss(logits, y)
        observe_loss(self.trainer, loss)  # schedule=halving mode=plateau watches every step
        correct = None if self.objective is not None else (logits.argmax(dim=1) == y).float().mean()
        self._accumulate_epoch(loss, correct, batch_idx)
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            # A logging step: keep what it logs (tensors: no host sync); on_train_batch_end
            # writes it once the optimizer has stepped (a micro-batch under gradient
            # accumulation overwrites it, as Lightning logs the last micro-batch's value).
            self._step_metrics = (self.global_step, loss.detach(), correct, self._stepsizes())
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._log_step_metrics()

    def _log_step_metrics(self) -> None:
        """``train/loss``, ``train/acc``, ``train/lr`` of a logging step, written to the loggers.

        The rule is ours, on public counters: the step k (``global_step`` before its optimizer
        step) is logged when ``(k + 1) % trainer.log_every_n_steps == 0``, as Lightning's rule
        reads. They are written here rather than through ``self.log`` on every step: each
        ``self.log`` call costs Lightning's result-collection bookkeeping, about a tenth of a
        small CPU step for three keys (README, Performance). Under DDP the loss and accuracy
        are the means over replicas (one all-reduce, every rank at the same steps).
        """
        if self._step_metrics is None or self._step_metrics[0] == self.global_step:
            return  # not a logging step, or gradients still accumulating (no step yet)
        step, loss, correct, stepsizes = self._step_metrics
        self._step_metrics = None
        acc = correct if correct is not None else loss.new_zeros((), dtype=torch.float32)
        values = torch.stack((loss.float(), acc.float()))
        means = self.trainer.strategy.reduce(values, reduce_op="mean").tolist()
        metrics = {"train/loss": means[0], **stepsizes}
        if correct is not None:
            metrics["train/acc"] = means[1]
        for key, value in metrics.items():  # the bar, and callback_metrics (optimized_metric)
            self.log(key, value, prog_bar=key == "train/loss", logger=False)
        if self.trainer.is_global_zero:
            # ``epoch`` with every point, as Lightning writes it with the metrics it logs.
            for logger in self.loggers:
                logger.log_metrics({**metrics, "epoch": self.current_epoch}, step=step)

    def _accumulate_epoch(
        self, loss: torch.Tensor, correct: torch.Tensor | None, batch_idx: int
    ) -> None:
        """Add this step to the epoch sums (device ops only); log the means at the last step."""
        step = torch.stack(
            (loss.detach().float(), correct if correct is not None else loss.new_zeros(()))
        )
        if self._epoch_sums is None or self._epoch_sums.device != step.device:
            base = self._epoch_sums
            self._epoch_sums = step.new_zeros(2) if base is None else base.to(step.device)
        self._epoch_sums.add_(step)
        self._epoch_steps += 1
        last = batch_idx + 1 >= self.trainer.num_training_batches or self.trainer.is_last_batch
        if last:
            self._log_epoch_means(self.global_step)

    def _log_epoch_means(self, step: int) -> None:
        """``train/loss_epoch`` (and ``train/acc_epoch``) at ``step``; then start a new epoch."""
        if not self._epoch_steps or self._epoch_sums is None:
            return
        means = self.trainer.strategy.reduce(self._epoch_sums / self._epoch_steps, reduce_op="mean")
        values = means.tolist()  # the one host sync of the epoch's curve
        metrics = {"train/loss_epoch": values[0]}
        if self.objective is None:
            metrics["train/acc_epoch"] = values[1]
        self._epoch_sums, self._epoch_steps = None, 0
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

    def on_train_epoch_end(self) -> None:
        # An epoch cut short (max_steps, limit_train_batches) still gets its point.
        self._log_epoch_means(max(self.global_step - 1, 0))

    def _stepsizes(self) -> dict[str, float]:
        """``train/lr`` (the first group's stepsize at this step), and ``train/lr/<group>``
        for every group when the groups' stepsizes differ."""
        groups = self.optimizers().optimizer.param_groups
        out = {"train/lr": float(groups[0]["lr"])}
        if len({g["lr"] for g in groups}) > 1:
            out.update({f"train/lr/{g.get('name', 'group')}": float(g["lr"]) for g in groups})
        return out

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.norm.before_optimizer_step(self.model)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.val_loss.update(self._loss(logits, y), weight=len(y))
        if self.objective is None and self.val_acc is not None:
            self.val_acc.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute())
        self.val_loss.reset()
        if self.objective is None and self.val_acc is not None:
            self.log("val/acc", self.val_acc.compute())
            self.val_acc.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        make, lr = self.make_optimizer, getattr(self.norm, "phase_lr", None)
        if lr is not None:  # norm.lr_after_switch: the whitened phase's own base stepsize
            make = functools.partial(make, lr=lr)
        optimizer = build_optimizer(make, self.make_groups, self.model, self.geometry)
        return {
            "optimizer": optimizer,
            "lr_scheduler": build_scheduler(
                self.make_scheduler,
                optimizer,
                self.lr_scheduler_config,
                total_steps=self.trainer.estimated_stepping_batches,
                total_epochs=self.trainer.max_epochs,
            ),
        }
