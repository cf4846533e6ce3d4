"""The plug interface shared by every normalization option."""

from __future__ import annotations

import torch
from torch import nn


class NormPlug:
    """Base plug: identity after every layer, no preparation, no gradient transform."""

    name = "base"

    def conv(self, channels: int) -> nn.Module:
        """Module placed after a hidden Conv2d with ``channels`` outputs."""
        return nn.Identity()

    def linear(self, features: int) -> nn.Module:
        """Module placed after a hidden Linear with ``features`` outputs."""
        return nn.Identity()

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Called once on the built model, before the optimizer exists."""

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Called after backward (and gradient clipping), before ``optimizer.step()``."""

    def on_train_batch_start(self, model: nn.Module, batch: torch.Tensor, step: int) -> None:
        """Called before each training forward (statistics schedules use it)."""
