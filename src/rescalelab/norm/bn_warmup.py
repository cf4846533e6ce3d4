"""``norm=bn_warmup``: k epochs with BatchNorm, then the same network in whitened form.

The lecture's fix for fast-drifting statistics: "running 2 BN epochs before whitening". At the
start of epoch ``k = warmup_epochs`` the switch is exact:

1. every BatchNorm is folded into the layer it follows (``rescalelab.norm.fold``): the plain
   network computes the BN network's eval-mode outputs;
2. whitening is attached to the folded layers and its ``μ``, ``Var`` are initialised from a
   no-grad pass (training mode) over ``init_batches`` training batches of the folded network —
   BN's own running statistics describe the previous layer's pre-activations, not these
   inputs — so the function is unchanged (whitening never changes it, see ``whitening.py``);
3. the optimizer is rebuilt by Lightning (``configure_optimizers``) for the new parameter
   list: its state (momentum buffers, Adam moments) starts from zero, and the schedule
   continues from its current position. ``lr_after_switch`` (when set) replaces ``optim.lr``
   as the base stepsize α of the whitened phase: the groups get ``lr_after_switch × (layer
   scale) × (schedule factor at the current step)``. The switch changes the effective step
   (at the same α, ‖Δw‖/‖w‖ fell 10–100× after it), so the whitened phase needs its own;
4. the switch is logged as metrics at the switch step: ``norm/switch_step``,
   ``norm/loss_before_switch`` (BN network, eval mode) and ``norm/loss_after_switch`` (folded,
   whitened network), both the training loss (cross-entropy) averaged over the probe batches
   of step 2. They are equal up to float rounding; they can be above the last ``train/loss``,
   which BatchNorm computed with the statistics of its own batch (train mode).

During warm-up BatchNorm uses torch's defaults (momentum 0.1, ε 1e-5). ``warmup_epochs=0``
is whitening from the first step (``switched_at_step = 0``). A checkpoint taken after the switch
records it (``checkpoint["rescalelab.norm"]``), and loading it rebuilds the folded structure
before the weights are restored, so a resumed run continues in the whitened phase.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from rescalelab.errors import ConfigError
from rescalelab.norm.fold import batchnorm_pairs, ensure_biases, fold_batchnorm, replace_batchnorms
from rescalelab.norm.plug import NormPlug
from rescalelab.norm.whitening import Whitening

if TYPE_CHECKING:
    import pytorch_lightning as pl

STATE_KEY = "rescalelab.norm"


class BnWarmup(NormPlug):
    """``norm=bn_warmup``: BatchNorm for ``warmup_epochs`` epochs, then whitening.

    ``momentum``, ``interval``, ``eps``, ``init_batches`` and the knobs for α ``eps_mode``,
    ``max_scale``, ``min_active`` are the whitening keys (see
    :class:`~rescalelab.norm.whitening.Whitening`); ``init_batches`` is also the number of
    training batches of the no-grad pass that initialises ``μ``, ``Var`` at the switch.
    ``lr_after_switch``: the base stepsize α of the whitened phase (``None``: ``optim.lr``);
    with ``warmup_epochs=0`` the whole run is whitened and uses it.
    """

    name = "bn_warmup"

    def __init__(
        self,
        warmup_epochs: int = 2,
        momentum: float = 0.1,
        interval: int = 1,
        eps: float = 1e-5,
        init_batches: int = 8,
        eps_mode: str = "absolute",
        max_scale: float | None = None,
        min_active: float | None = None,
        lr_after_switch: float | None = None,
    ) -> None:
        if (
            not isinstance(warmup_epochs, int)
            or isinstance(warmup_epochs, bool)
            or warmup_epochs < 0
        ):
            raise ConfigError(
                f"norm.warmup_epochs={warmup_epochs!r} is invalid: expected an integer >= 0"
            )
        if lr_after_switch is not None and (
            isinstance(lr_after_switch, bool)
            or not isinstance(lr_after_switch, (int, float))
            or not lr_after_switch > 0
        ):
            raise ConfigError(
                f"norm.lr_after_switch={lr_after_switch!r} is invalid: expected a number > 0 or null"
            )
        self.warmup_epochs = warmup_epochs
        self.lr_after_switch = None if lr_after_switch is None else float(lr_after_switch)
        self.whitening = Whitening(
            momentum, interval, eps, init_batches, eps_mode, max_scale, min_active
        )
        self.switched_at_step: int | None = None
        self.input_shape: tuple[int, ...] | None = None

    @property
    def phase_lr(self) -> float | None:
        """The base stepsize that replaces ``optim.lr`` now: ``lr_after_switch`` once whitened."""
        return self.lr_after_switch if self.switched_at_step is not None else None

    # -- the model --------------------------------------------------------------------------
    def conv(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if self.warmup_epochs > 0 else nn.Identity()

    def linear(self, features: int) -> nn.Module:
        return nn.BatchNorm1d(features) if self.warmup_epochs > 0 else nn.Identity()

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.input_shape = tuple(input_shape)
        if self.warmup_epochs == 0:
            self.whitening.attach(model, self.input_shape)
            self.switched_at_step = 0

    # -- training hooks -----------------------------------------------------------------------
    def on_train_batch_start(self, model: nn.Module, batch: Tensor, step: int) -> None:
        self.whitening.on_train_batch_start(model, batch, step)

    def before_optimizer_step(self, model: nn.Module) -> None:
        self.whitening.before_optimizer_step(model)

    def on_train_epoch_start(self, module: pl.LightningModule) -> None:
        if self.switched_at_step is None and module.current_epoch >= self.warmup_epochs:
            self.switch(module)

    def switch(self, module: pl.LightningModule) -> dict[str, float]:
        """Fold, whiten, rebuild the optimizer and log; return the logged metrics."""
        trainer = module.trainer
        batches = probe_batches(trainer, module.device, self.whitening.init_batches)
        loss = getattr(module, "_loss", None)  # the module's objective (cross-entropy by default)
        before, after = self.switch_model(module.model, batches, loss)
        step = int(module.global_step)
        self.switched_at_step = step
        rebuild_optimizers(trainer)
        if trainer.is_global_zero:
            logging.getLogger(__name__).info(f"bn_warmup: switched to whitening at step {step} (epoch {module.current_epoch}): BN folded, loss {before:.4g} -> {after:.4g}")  # fmt: skip
        metrics = {
            "norm/switch_step": float(step),
            "norm/loss_before_switch": before,
            "norm/loss_after_switch": after,
        }
        for logger in module.loggers:
            logger.log_metrics(metrics, step=step)
        return metrics

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
        shape = tuple(batches[0][0].shape[1:])
        self.input_shape = self.input_shape or shape
        before = eval_loss(model, batches, loss)
        fold_batchnorm(model, shape)
        layers = self.whitening.attach(model, shape)
        layers.initialise(model, [x for x, _ in batches])
        return before, eval_loss(model, batches, loss)

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STATE_KEY] = {
            "name": self.name,
            "switched_at_step": self.switched_at_step,
            "input_shape": list(self.input_shape) if self.input_shape else None,
        }

    def on_load_checkpoint(self, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(STATE_KEY) or {}
        step = state.get("switched_at_step")
        if step is not None and self.switched_at_step is None:
            # Rebuild the folded structure; the checkpoint's state dict then fills in the values.
            shape = tuple(state.get("input_shape") or self.input_shape or ())
            pairs = batchnorm_pairs(module.model, shape)
            ensure_biases(module.model, pairs)
            replace_batchnorms(module.model, pairs)
            self.whitening.attach(module.model, shape)
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


def probe_batches(trainer: pl.Trainer, device: torch.device, n: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``n`` training batches of the current epoch, without touching the loop's iterator."""
    from rescalelab.data.tensor_batches import TensorBatches  # the data package imports Lightning

    loader = trainer.train_dataloader
    if isinstance(loader, TensorBatches):
        source: Any = TensorBatches(
            loader.x, loader.y, loader.batch_size, shuffle=loader.shuffle, seed=loader.seed,
            drop_last=loader.drop_last, transform=loader.transform, rank=loader.rank,
            world_size=loader.world_size,
        )  # fmt: skip
        source.set_epoch(trainer.current_epoch)
    else:
        source = loader
    batches = []
    for x, y in source:
        batches.append((x.to(device), y.to(device)))
        if len(batches) == n:
            break
    return batches


def continue_schedule(old: LRScheduler, new: LRScheduler) -> None:
    """Move the freshly built scheduler ``new`` to ``old``'s position, stepsizes included.

    ``LambdaLR`` (every factor schedule of ``rescalelab.optim.schedules``) is set in closed
    form, ``α_k = base × factor(k)``. Any other scheduler gets ``old``'s non-per-group state
    (step count, plateau counters) and each group its own initial stepsize times the ratio of
    the same-named old group's current to initial stepsize (so a new base stepsize, e.g.
    ``lr_after_switch``, carries over); a group the old optimizer did not have takes the first
    group's ratio.
    """
    k = old.last_epoch
    groups = new.optimizer.param_groups
    if isinstance(new, LambdaLR):
        new.last_epoch = k
        for group, base, lam in zip(groups, new.base_lrs, new.lr_lambdas):
            group["lr"] = base * lam(k)
    else:
        n_old = len(old.optimizer.param_groups)
        state = {
            key: value for key, value in old.state_dict().items()
            if not (isinstance(value, list) and len(value) == n_old)
        }  # fmt: skip
        new.load_state_dict({**new.state_dict(), **state})
        ratio_of = {
            g.get("name"): g["lr"] / g.get("initial_lr", g["lr"])
            for g in old.optimizer.param_groups
        }
        first = next(iter(ratio_of.values()), 1.0)
        for group in groups:
            ratio = ratio_of.get(group.get("name"), first)
            group["lr"] = group.get("initial_lr", group["lr"]) * ratio
    new._last_lr = [g["lr"] for g in groups]


def rebuild_optimizers(trainer: pl.Trainer) -> None:
    """Re-run ``configure_optimizers`` for the current parameters; schedules keep their position.

    Under DDP the model is wrapped again, since DistributedDataParallel records its parameters
    when it is built.
    """
    old = [config.scheduler for config in trainer.lr_scheduler_configs]
    strategy = trainer.strategy
    if hasattr(strategy, "configure_ddp") and trainer.world_size > 1:
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
    for before, config in zip(old, trainer.lr_scheduler_configs):
        continue_schedule(before, config.scheduler)
