"""The LightningModule: cross-entropy training of any model, with the norm plug wired in."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from rescalelab.models.geometry import LayerGeometry
from rescalelab.norm import NoNorm, NormPlug
from rescalelab.optim import build_optimizer, build_scheduler, observe_loss


class Classifier(pl.LightningModule):
    """Trains ``model`` on ``(x, y)`` batches with cross-entropy.

    Logs ``train/loss``, ``train/acc`` and ``train/lr`` per step (Lightning writes them every
    ``trainer.log_every_n_steps``) and ``val/loss``, ``val/acc`` per epoch. ``train/lr`` is the
    stepsize actually used at that step by the first parameter group (the base stepsize times
    its layer scale); ``train/lr/<group>`` is logged too when groups differ.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optim: DictConfig,
        schedule: DictConfig,
        norm: NormPlug | None = None,
        geometry: dict[str, LayerGeometry] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.norm = norm or NoNorm()
        self.optim_cfg, self.schedule_cfg = optim, schedule
        self.geometry = geometry
        self.val_acc: MulticlassAccuracy | None = None
        if num_classes >= 2:
            self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss = MeanMetric()
        # A DataModule with ``objective(outputs, y, model)`` (the convex problems) replaces
        # cross-entropy by its exact objective, regularizer included; accuracy is then not logged.
        self.objective: Any = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets ``_current_fx_name`` around every hook call, ~40 times a training step;
        # nn.Module.__setattr__ searches parameters, buffers and submodules each time. A plain
        # attribute write keeps ~1% of a small CPU step.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

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

    def on_train_epoch_start(self) -> None:
        self.norm.on_train_epoch_start(self)  # norm=bn_warmup switches to whitening here

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.norm.on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.norm.on_load_checkpoint(self, checkpoint)  # before the state dict is loaded

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self._loss(logits, y)
        observe_loss(self.trainer, loss)  # schedule=halving mode=plateau watches every step
        if self._is_logging_step():
            # Lightning writes step metrics only every log_every_n_steps; computing and
            # self.log-ing them on the other steps would cost time and change nothing.
            # sync_dist: under DDP, the mean over the global batch (a no-op on one process).
            self.log("train/loss", loss, prog_bar=True, sync_dist=True)
            if self.objective is None:
                self.log("train/acc", (logits.argmax(dim=1) == y).float().mean(), sync_dist=True)
            self._log_stepsizes()
        return loss

    def _is_logging_step(self) -> bool:
        """True on the steps Lightning sends to the logger (same rule as its logger connector)."""
        every = self.trainer.log_every_n_steps
        return (self.global_step + 1) % every == 0 or self.trainer.should_stop

    def _log_stepsizes(self) -> None:
        groups = self.optimizers().optimizer.param_groups
        self.log("train/lr", float(groups[0]["lr"]))
        if len({g["lr"] for g in groups}) > 1:
            for g in groups:
                self.log(f"train/lr/{g.get('name', 'group')}", float(g["lr"]))

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
        optimizer = build_optimizer(self.optim_cfg, self.model, self.geometry)
        return {
            "optimizer": optimizer,
            "lr_scheduler": build_scheduler(
                self.schedule_cfg,
                optimizer,
                total_steps=self.trainer.estimated_stepping_batches,
                total_epochs=self.trainer.max_epochs,
            ),  # fmt: skip
        }
