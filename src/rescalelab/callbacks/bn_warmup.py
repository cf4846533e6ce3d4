"""``norm=bn_warmup``'s switch (:class:`BnWarmupSwitch`) and ``callbacks=bn_warmup``: were k
BatchNorm warm-up epochs enough before whitening?

**The switch.** ``norm=bn_warmup`` brings :class:`BnWarmupSwitch` to every fit
(``Classifier.configure_callbacks``). At the start of epoch ``norm.warmup_epochs`` it takes the
first ``init_batches`` training batches of the epoch, has the plug fold BN and whiten the model
(``BnWarmup.switch_model``), rebuilds the optimizer and its schedule through Lightning's public
``strategy.setup_optimizers`` (which calls ``configure_optimizers``; under DDP the model is
wrapped again first, since DistributedDataParallel records its parameters when it is built),
moves the new schedule to the old one's position (:func:`continue_schedule`) and logs
``norm/switch_step``, ``norm/loss_before_switch``, ``norm/loss_after_switch`` once, on rank 0,
through ``trainer.loggers`` at the switch step.

**The monitor.**
With ``norm=bn_warmup`` the network trains with BatchNorm for ``norm.warmup_epochs`` epochs,
then BN is folded into the layers and training continues in the whitened parametrization (μ_i,
α_i running estimates of each layer's inputs, β_j² = 1/sqrt(share·fanin)). The lecture: without
warm-up the statistics drift faster than the running estimates follow, and stale μ, α give big
unwarranted updates that push units into the flat region of the ReLU; "2 BN epochs before
whitening" fix it. :class:`BNWarmupMonitor` logs, at the switch step, the numbers that say
whether the chosen k was enough (one batched call, when the epoch after the switch is over),
all at the switch step (the step itself is ``norm/switch_step``, logged once by the switch):

* ``bn_warmup/loss_before`` (training loss of the last warm-up step), ``loss_before_mean`` (mean
  over the last ``window`` warm-up steps), ``loss_after`` (first whitened step);
* ``bn_warmup/max_spike`` = max of the training loss over the epoch after the switch minus
  ``loss_before_mean``, ``max_spike_ratio`` (max / ``loss_before_mean``), ``max_spike_step``;
* the lag of the running estimates right before and right after the switch, from the drift
  monitor's probes (``lag_mean_z_probe``, ``lag_logvar_probe``) and minibatches (``lag_mean_z``,
  ``lag_logvar``): ``bn_warmup/<layer>/<stat>_before|_after`` and the worst layer as
  ``bn_warmup/<stat>_before|_after``. Before the switch they are BN's running statistics (of the
  BN inputs), after it the whitening μ, Var of the folded layers' inputs;
* ``bn_warmup/<layer>/dead_frac_jump``: the largest ``dead_frac`` over the epoch after the switch
  minus the value right before it, and its maximum over layers ``bn_warmup/dead_frac_jump``.

It needs the drift monitor (``callbacks=bn_warmup`` includes it) for the lag and dead-unit
numbers, and does nothing with a norm option that has no warm-up. The report is also written
as ``drift/bn_warmup.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from rescalelab.callbacks.drift import DriftMonitor
from rescalelab.callbacks.drift.monitor import steps_per_epoch as _steps_per_epoch
from rescalelab.errors import at_least, checked, required

LAG_STATS = ("lag_mean_z_probe", "lag_logvar_probe", "lag_mean_z", "lag_logvar")


class BnWarmupSwitch(pl.Callback):
    """Switches ``plug`` (a :class:`~rescalelab.norm.bn_warmup.BnWarmup`) from BN to whitening
    at the start of its epoch, rebuilds the optimizer and logs the switch (module docstring)."""

    def __init__(self, plug: Any) -> None:
        super().__init__()
        self.plug = plug

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.plug.due(trainer.current_epoch):
            return
        batches = first_batches(trainer, pl_module.device, self.plug.whitening.init_batches)
        # The module's objective (cross-entropy by default) for the losses before and after.
        loss = getattr(pl_module, "_loss", None)
        before, after = self.plug.switch_model(pl_module.model, batches, loss)
        step = trainer.global_step
        self.plug.switched_at_step = step
        rebuild_optimizers(trainer)
        if not trainer.is_global_zero:
            return
        logging.getLogger("rescalelab.norm.bn_warmup").info(f"bn_warmup: switched to whitening at step {step} (epoch {trainer.current_epoch}): BN folded, loss {before:.4g} -> {after:.4g}")  # fmt: skip
        metrics = {
            "norm/switch_step": float(step),
            "norm/loss_before_switch": before,
            "norm/loss_after_switch": after,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def first_batches(trainer: pl.Trainer, device: torch.device, n: int) -> list[tuple[Tensor, Tensor]]:
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


def rebuild_optimizers(trainer: pl.Trainer) -> None:
    """Re-run ``configure_optimizers`` for the current parameters; schedules keep their position.

    Under DDP the model is wrapped again (``DDPStrategy.configure_ddp``), since
    DistributedDataParallel records its parameters when it is built.
    """
    old = [config.scheduler for config in trainer.lr_scheduler_configs]
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and trainer.world_size > 1:
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
    for before, config in zip(old, trainer.lr_scheduler_configs):
        continue_schedule(before, config.scheduler)


def continue_schedule(old: LRScheduler, new: LRScheduler) -> None:
    """Move the freshly built scheduler ``new`` to ``old``'s position, stepsizes included.

    ``LambdaLR`` (every factor schedule of ``rescalelab.optim.schedules``) is set in closed
    form, ``α_k = base × factor(k)``. Any other scheduler gets ``old``'s non-per-group state
    (step count, plateau counters) and each group its own initial stepsize times the ratio of
    the same-named old group's current to initial stepsize (so a new base stepsize, e.g.
    ``lr_after_switch``, carries over); a group the old optimizer did not have takes the first
    group's ratio. The stepsizes are set on the optimizer's groups, which is what the next
    ``optimizer.step()`` uses; ``new.get_last_lr()`` reports them from its next step on.
    """
    k = old.last_epoch
    groups = new.optimizer.param_groups
    if isinstance(new, LambdaLR):
        new.last_epoch = k
        for group, base, lam in zip(groups, new.base_lrs, new.lr_lambdas):
            group["lr"] = base * lam(k)
        return
    n_old = len(old.optimizer.param_groups)
    state = {
        key: value for key, value in old.state_dict().items()
        if not (isinstance(value, list) and len(value) == n_old)
    }  # fmt: skip
    new.load_state_dict({**new.state_dict(), **state})
    ratio_of = {
        g.get("name"): g["lr"] / g.get("initial_lr", g["lr"]) for g in old.optimizer.param_groups
    }
    first = next(iter(ratio_of.values()), 1.0)
    for group in groups:
        ratio = ratio_of.get(group.get("name"), first)
        group["lr"] = group.get("initial_lr", group["lr"]) * ratio


@checked("callbacks.bn_warmup", window=required(at_least(1)), extra_steps=required(at_least(1)))
class BNWarmupMonitor(pl.Callback):
    """Loss, lag and dead-unit numbers around the BN → whitening switch (module docstring).

    Args:
        window: warm-up steps averaged into ``loss_before_mean`` (an integer >= 1).
        extra_steps: steps from the switch on that the drift monitor instruments densely (an
            integer >= 1).
    """

    def __init__(self, window: int = 10, extra_steps: int = 5) -> None:
        super().__init__()
        self.window, self.extra_steps = window, extra_steps
        self.report: dict[str, float] = {}

    # -- setup ----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plug = getattr(pl_module, "norm", None)
        self.active = self.plug is not None and hasattr(self.plug, "warmup_epochs")
        self.drift = next((c for c in trainer.callbacks if isinstance(c, DriftMonitor)), None)
        self._losses: list[tuple[int, torch.Tensor]] = []
        self._step = 0
        self.switch_step: int | None = None
        self.report = {}
        self._done = False
        if not self.active:
            name = getattr(self.plug, "name", None)
            rank_zero_info(f"callbacks.bn_warmup: norm={name} has no BN warm-up: nothing to log")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # This monitor runs before BnWarmupSwitch (the module's callbacks come after the
        # configured ones): when this epoch start is the switch, have the drift monitor
        # instrument its first steps.
        if not self.active or self.drift is None:
            return
        if self.plug.due(trainer.current_epoch):
            s = trainer.global_step
            self.drift.extra_steps.update(range(s, s + self.extra_steps))

    # -- the loop -------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.active:
            return
        self._step = trainer.global_step
        if self.switch_step is None and self.plug.switched_at_step is not None:
            self.switch_step = int(self.plug.switched_at_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *_: Any
    ) -> None:
        if not self.active or self._done:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append((self._step, loss.detach().float().reshape(())))  # no sync
        if self.switch_step is None:
            del self._losses[: max(0, len(self._losses) - self.window - 1)]
        elif trainer.global_step >= self.switch_step + max(_steps_per_epoch(trainer), 1):
            self._finish(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and not self._done and self.switch_step is not None:
            self._finish(trainer)

    # -- the report -----------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer) -> None:
        self._done = True
        steps = np.array([s for s, _ in self._losses], dtype=np.int64)
        values = torch.stack([v for _, v in self._losses]) if self._losses else torch.zeros(0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)  # the global batch's loss: mean over ranks
            values = values / torch.distributed.get_world_size()
        host = values.cpu().numpy().astype(np.float64)  # one host copy
        self._losses = []
        if not trainer.is_global_zero:
            return
        self.report = self.summarise(steps, host, _steps_per_epoch(trainer))
        from rescalelab.tracking.artifacts import log_json

        for logger in trainer.loggers:  # the run's one metric path (queue, retry, resume)
            logger.log_metrics(self.report, step=int(self.switch_step or 0))
        path = Path(trainer.default_root_dir) / "drift" / "bn_warmup.json"
        log_json(trainer.loggers, self.report, path, "drift")

    def summarise(
        self, steps: np.ndarray, losses: np.ndarray, steps_per_epoch: int
    ) -> dict[str, float]:
        """The metrics of the module docstring from per-step losses and the drift records."""
        sw = int(self.switch_step or 0)
        out: dict[str, float] = {}  # the switch step itself is norm/switch_step (BnWarmupSwitch)
        before = losses[steps < sw]
        after_mask = (steps >= sw) & (steps < sw + max(steps_per_epoch, 1))
        after = losses[after_mask]
        if len(before):
            out["bn_warmup/loss_before"] = float(before[-1])
            out["bn_warmup/loss_before_mean"] = float(np.mean(before[-self.window :]))
        if len(after):
            out["bn_warmup/loss_after"] = float(after[0])
            k = int(np.argmax(after))
            out["bn_warmup/max_loss_after"] = float(after[k])
            out["bn_warmup/max_spike_step"] = float(steps[after_mask][k])
            if len(before):
                ref = out["bn_warmup/loss_before_mean"]
                out["bn_warmup/max_spike"] = float(after[k]) - ref
                if ref > 0:
                    out["bn_warmup/max_spike_ratio"] = float(after[k]) / ref
        if self.drift is not None:
            out.update(self._lags(sw))
            out.update(self._dead_jumps(sw, steps_per_epoch))
        return out

    def _records(self) -> dict[int, dict[str, float]]:
        return self.drift.by_step if self.drift is not None else {}

    def _per_layer(self, step: int, stat: str) -> dict[str, float]:
        rec = self._records().get(step, {})
        suffix = "/" + stat
        return {
            k[len("drift/") : -len(suffix)]: v
            for k, v in rec.items()
            if k.endswith(suffix) and k.startswith("drift/") and math.isfinite(v)
        }

    def _lags(self, sw: int) -> dict[str, float]:
        out: dict[str, float] = {}
        steps = sorted(self._records())
        for stat in LAG_STATS:
            have = [s for s in steps if self._per_layer(s, stat)]
            for side, pick in (
                ("before", [s for s in have if s < sw][-1:]),
                ("after", [s for s in have if s >= sw][:1]),
            ):
                if not pick:
                    continue
                layers = self._per_layer(pick[0], stat)
                for layer, v in layers.items():
                    out[f"bn_warmup/{layer}/{stat}_{side}"] = v
                out[f"bn_warmup/{stat}_{side}"] = max(layers.values())
                out[f"bn_warmup/{stat}_{side}_step"] = float(pick[0])
        return out

    def _dead_jumps(self, sw: int, steps_per_epoch: int) -> dict[str, float]:
        out: dict[str, float] = {}
        steps = sorted(self._records())
        before = [s for s in steps if s < sw and self._per_layer(s, "dead_frac")][-1:]
        after = [s for s in steps if sw <= s < sw + max(steps_per_epoch, 1)]
        if not before or not after:
            return out
        ref = self._per_layer(before[0], "dead_frac")
        jumps = []
        for layer, v0 in ref.items():
            vals = [self._per_layer(s, "dead_frac").get(layer) for s in after]
            vals = [v for v in vals if v is not None]
            if vals:
                jump = max(vals) - v0
                out[f"bn_warmup/{layer}/dead_frac_jump"] = jump
                jumps.append(jump)
        if jumps:
            out["bn_warmup/dead_frac_jump"] = max(jumps)
        return out
