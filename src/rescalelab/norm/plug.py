"""The plug interface shared by every normalization option."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    import pytorch_lightning as pl


class NormPlug:
    """Base plug: identity after every layer, no preparation, no gradient transform.

    ``switched_at_step`` is the global step at which training entered its whitened phase
    (``norm=bn_warmup``: the BN → whitening switch; ``None`` while it has not happened or for
    plugs without such a phase). Instruments read it to mark the switch on their curves.
    """

    name = "base"
    switched_at_step: int | None = None

    def conv(self, channels: int) -> nn.Module:
        """Module placed after a hidden Conv2d with ``channels`` outputs."""
        return nn.Identity()

    def linear(self, features: int) -> nn.Module:
        """Module placed after a hidden Linear with ``features`` outputs."""
        return nn.Identity()

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Called once on the built model, before the optimizer exists."""

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Called after backward, before ``optimizer.step()`` and before Lightning clips gradients."""

    def on_train_batch_start(self, model: nn.Module, batch: torch.Tensor, step: int) -> None:
        """Called before each training forward (statistics schedules use it)."""

    def on_train_epoch_start(self, module: pl.LightningModule) -> None:
        """Called at the start of every training epoch, after the data of the epoch is set up."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the plug's own state (not held in model buffers) to a Lightning checkpoint."""

    def on_load_checkpoint(self, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Called before the checkpoint's state dict is loaded into ``module`` (restore structure)."""
