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
from rescalelab.optim import build_optimizer, build_scheduler


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
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss = MeanMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.norm.on_train_batch_start(self.model, batch[0], self.global_step)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        if self._is_logging_step():
            # Lightning writes step metrics only every log_every_n_steps; computing and
            # self.log-ing them on the other steps would cost time and change nothing.
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/acc", (logits.argmax(dim=1) == y).float().mean())
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
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.val_acc.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute())
        self.log("val/acc", self.val_acc.compute())
        self.val_loss.reset()
        self.val_acc.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.optim_cfg, self.model, self.geometry)
        return {
            "optimizer": optimizer,
            "lr_scheduler": build_scheduler(self.schedule_cfg, optimizer),
        }
