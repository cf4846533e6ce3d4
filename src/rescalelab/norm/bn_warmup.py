"""``norm=bn_warmup``: k epochs with BatchNorm, then the same network in whitened form.

The lecture's fix for fast-drifting statistics: "running 2 BN epochs before whitening". At the
start of epoch ``k = warmup_epochs`` the switch is exact:

1. every BatchNorm is folded into the layer it follows (``rescalelab.norm.fold``): the plain
   network computes the BN network's eval-mode outputs;
2. whitening is attached to the folded layers (β² from the geometry of the fit: folding keeps
   every layer's share and fanin) and its ``μ``, ``Var`` are initialised from a no-grad pass
   (training mode) over ``init_batches`` training batches of the folded network — BN's own
   running statistics describe the previous layer's pre-activations, not these inputs — so the
   function is unchanged (whitening never changes it, see ``whitening.py``);
3. the optimizer is rebuilt for the new parameter list: its state (momentum buffers, Adam
   moments) starts from zero, and the schedule continues from its current position.
   ``lr_after_switch`` (when set) replaces ``optim.lr`` as the base stepsize α of the whitened
   phase: the groups get ``lr_after_switch × (layer scale) × (schedule factor at the current
   step)``. The switch changes the effective step (at the same α, ‖Δw‖/‖w‖ fell 10–100× after
   it), so the whitened phase needs its own;
4. the switch is logged once, at the switch step: ``norm/switch_step``,
   ``norm/loss_before_switch`` (BN network, eval mode) and ``norm/loss_after_switch`` (folded,
   whitened network), both the training loss (cross-entropy) averaged over the probe batches
   of step 2. They are equal up to float rounding; they can be above the last ``train/loss``,
   which BatchNorm computed with the statistics of its own batch (train mode).

This plug holds the model side (1, 2, the phase and its checkpoint state); the Lightning side
(when to switch, the probe batches, 3 and 4) is the callback it brings to the fit,
:class:`rescalelab.callbacks.bn_warmup.BnWarmupSwitch`.

During warm-up BatchNorm uses torch's defaults (momentum 0.1, ε 1e-5). ``warmup_epochs=0``
is whitening from the first step (``switched_at_step = 0``). A checkpoint taken after the switch
records it (``checkpoint["rescalelab.norm"]``), and loading it rebuilds the folded structure
before the weights are restored, so a resumed run continues in the whitened phase.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rescalelab.errors import Expect, at_least, checked
from rescalelab.geometry import LayerGeometry
from rescalelab.norm.fold import batchnorm_pairs, ensure_biases, fold_batchnorm, replace_batchnorms
from rescalelab.norm.plug import NormPlug
from rescalelab.norm.whitening import WHITENING, Whitening

if TYPE_CHECKING:
    import pytorch_lightning as pl

STATE_KEY = "rescalelab.norm"


@checked(
    "norm",
    warmup_epochs=at_least(0),
    lr_after_switch=Expect(float, lambda v: v > 0, "a number > 0 or null"),
    **WHITENING,
)
class BnWarmup(NormPlug):
    """``norm=bn_warmup``: BatchNorm for ``warmup_epochs`` epochs, then whitening.

    ``lr_after_switch``: the base stepsize α of the whitened phase (``None``: ``optim.lr``);
    with ``warmup_epochs=0`` the whole run is whitened and uses it. Every other keyword is a
    key of :class:`~rescalelab.norm.whitening.Whitening` (``momentum``, ``interval``, ``eps``,
    ``init_batches``, the knobs for α), with its defaults; ``init_batches`` is also the number
    of training batches of the no-grad pass that initialises ``μ``, ``Var`` at the switch.
    They go on to :class:`Whitening` (``**whitening``) and are declared here by their checks
    (``errors.checked``), so that a call and the config node are checked as Whitening's are;
    that ``warmup_epochs`` leaves whitened epochs in ``trainer.max_epochs`` is a check across
    groups (``rescalelab.validate.check_warmup``).
    """

    name = "bn_warmup"

    def __init__(
        self, warmup_epochs: int = 2, lr_after_switch: float | None = None, **whitening: Any
    ) -> None:
        self.warmup_epochs = warmup_epochs
        self.lr_after_switch = None if lr_after_switch is None else float(lr_after_switch)
        self.whitening = Whitening(**whitening)
        self.switched_at_step: int | None = None
        self.geometry: dict[str, LayerGeometry] | None = None
        self.pairs: list[tuple[str, str]] = []  # (layer, BatchNorm) folded at the switch

    @property
    def phase_lr(self) -> float | None:
        """The base stepsize that replaces ``optim.lr`` now: ``lr_after_switch`` once whitened."""
        return self.lr_after_switch if self.switched_at_step is not None else None

    # -- the model --------------------------------------------------------------------------
    def conv(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if self.warmup_epochs > 0 else nn.Identity()

    def linear(self, features: int) -> nn.Module:
        return nn.BatchNorm1d(features) if self.warmup_epochs > 0 else nn.Identity()

    def prepare(self, model: nn.Module, geometry: dict[str, LayerGeometry]) -> None:
        self.geometry = geometry
        if self.warmup_epochs == 0:
            self.whitening.attach(model, geometry)
            self.switched_at_step = 0

    def due(self, epoch: int) -> bool:
        """Whether training must switch at the start of ``epoch``."""
        return self.switched_at_step is None and epoch >= self.warmup_epochs

    def callbacks(self) -> list[pl.Callback]:
        # Imported here: the callbacks package imports Lightning and the drift instruments,
        # which building a model does not need.
        from rescalelab.callbacks.bn_warmup import BnWarmupSwitch

        return [BnWarmupSwitch(self)]

    # -- training hooks -----------------------------------------------------------------------
    def on_train_batch_start(self, model: nn.Module, batch: Tensor, step: int) -> None:
        self.whitening.on_train_batch_start(model, batch, step)

    def before_optimizer_step(self, model: nn.Module) -> None:
        self.whitening.before_optimizer_step(model)

    def switch_model(
        self,
        model: nn.Module,
        batches: list[tuple[Tensor, Tensor]],
        loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> tuple[float, float]:
        """Fold the BatchNorms of ``model`` and whiten it, initialising ``μ``, ``Var`` on ``batches``.

        Returns the eval-mode ``loss`` (cross-entropy by default) on ``batches`` before and after
        (equal up to float rounding: the function does not change).
        """
        if self.geometry is None:
            raise RuntimeError("BnWarmup.switch_model before prepare(model, geometry)")
        before = eval_loss(model, batches, loss)
        self.pairs = fold_batchnorm(model, tuple(batches[0][0].shape[1:]))
        layers = self.whitening.attach(model, self.geometry)
        layers.initialise(model, [x for x, _ in batches])
        return before, eval_loss(model, batches, loss)

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STATE_KEY] = {
            "name": self.name,
            "switched_at_step": self.switched_at_step,
            "pairs": [list(p) for p in self.pairs],
        }

    def on_load_checkpoint(self, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(STATE_KEY) or {}
        step = state.get("switched_at_step")
        if step is not None and self.switched_at_step is None:
            # Rebuild the folded structure; the checkpoint's state dict then fills in the values.
            if "pairs" in state:
                pairs = [(layer, bn) for layer, bn in state["pairs"]]
            else:  # a checkpoint written before the pairs were recorded: find them again
                pairs = batchnorm_pairs(module.model, tuple(state["input_shape"]))
            ensure_biases(module.model, pairs)
            replace_batchnorms(module.model, pairs)
            self.pairs = pairs
            self.whitening.attach(module.model, self.geometry or {})
            self.switched_at_step = int(step)
        self.whitening.on_load_checkpoint(module, checkpoint)


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> float:
    """Mean ``loss`` (cross-entropy by default) of ``model`` in eval mode over ``batches``."""
    loss = loss or F.cross_entropy
    was_training = model.training
    model.eval()
    try:
        total = sum(float(loss(model(x), y)) * len(y) for x, y in batches)
        count = sum(len(y) for _, y in batches)
    finally:
        model.train(was_training)
    return total / count
