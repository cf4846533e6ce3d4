"""The plug interface shared by every normalization option.

:class:`NormPlug` is what the models and the LightningModule rely on: a ``typing.Protocol``, so
any object with these members is a plug. Its bodies are the defaults (identity after every
layer, hooks that do nothing); the plugs of ``rescalelab.norm`` subclass it explicitly to
inherit them (PEP 544) and write only what they change.

:data:`MOMENTUM` and :data:`EPS` are the expectations of the two keys most plugs share
(``norm.momentum``, ``norm.eps``): each plug declares them on its constructor with
:func:`rescalelab.errors.checked`, which checks a call and, through
:func:`rescalelab.validate.check_targets`, the config node before anything is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from rescalelab.errors import Expect, above
from rescalelab.geometry import LayerGeometry

if TYPE_CHECKING:
    import pytorch_lightning as pl

# ρ, the weight of the new batch in a running average (torch BatchNorm's meaning)
MOMENTUM = Expect(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
EPS = above(0)  # ε in 1/sqrt(Var + ε)


@runtime_checkable
class NormPlug(Protocol):
    """What a normalization option provides.

    ``switched_at_step`` is the global step at which training entered its whitened phase
    (``norm=bn_warmup``: the BN → whitening switch; ``None`` while it has not happened or for
    plugs without such a phase). Callbacks read it to mark the switch on their curves.
    """

    name: str = "base"
    switched_at_step: int | None = None

    def conv(self, channels: int) -> nn.Module:
        """Module placed after a hidden Conv2d with ``channels`` outputs."""
        return nn.Identity()

    def linear(self, features: int) -> nn.Module:
        """Module placed after a hidden Linear with ``features`` outputs."""
        return nn.Identity()

    def prepare(self, model: nn.Module, geometry: dict[str, LayerGeometry]) -> None:
        """Called once on the built model, before the optimizer exists, with the share and
        fanin of its layers (``rescalelab.geometry.layer_geometry``, computed once per fit)."""

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Called after backward, before ``optimizer.step()`` and before Lightning clips gradients."""

    def on_train_batch_start(self, model: nn.Module, batch: torch.Tensor, step: int) -> None:
        """Called before each training forward (statistics schedules use it)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the plug's own state (not held in model buffers) to a Lightning checkpoint."""

    def on_load_checkpoint(self, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Called before the checkpoint's state dict is loaded into ``module`` (restore structure)."""

    def callbacks(self) -> list[pl.Callback]:
        """Lightning callbacks the plug needs during a fit (``Classifier.configure_callbacks``)."""
        return []
