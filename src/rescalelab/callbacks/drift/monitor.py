"""``callbacks=drift``: :class:`DriftMonitor`, the Lightning callback of the drift instruments.

On an instrumented step (a :class:`~rescalelab.callbacks.drift.stats.Schedule`, plus the probe
steps and the steps another callback asks for) it opens the collector's gate before the forward,
records the weight and gradient norms before the optimizer step and, after it, gathers the
statistics (one all-reduce, one host copy), summarises them per layer
(:class:`~rescalelab.callbacks.drift.stats.HostSummary`) and logs the scalars
``drift/<layer>/<stat>`` through ``trainer.loggers``: the run's resilient logger queues them off
the training thread, retries them through a store outage and drops steps a resumed run replays.
Per-unit vectors go to ``drift/arrays/epoch_<e>.npz``; at the end of fit, and when the fit fails
(a diverged run is the one to diagnose), ``drift/summary.parquet``, ``drift/meta.json`` and the
figures ``drift/figures/*.png`` (:mod:`~rescalelab.callbacks.drift.outputs`).

The monitor only reads: it never changes a parameter, a gradient, a buffer or an RNG state, so
a run with ``callbacks=drift`` logs the same training metrics as one without.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from rescalelab.callbacks.drift import outputs
from rescalelab.callbacks.drift import stats as ds
from rescalelab.callbacks.drift.collector import StatsCollector
from rescalelab.callbacks.drift.probe import auto_probe, probe_batches
from rescalelab.errors import FLAG, Expect, above, at_least, checked, one_of, required

POSITIVE_NUMBER = above(0)

# What goes to MLflow as metrics on every instrumented step with ``metrics: compact``; every
# statistic, always, goes to drift/summary.parquet.
COMPACT_STATS = frozenset(
    {
        "mean_z", "logvar_med", "drift_mean", "drift_logvar", "dead_frac", "grad_norm",
        "update_ratio", "lag_mean_z", "lag_logvar", "noise_floor", "lag_steps",
        "lag_mean_z_probe", "lag_logvar_probe", "lag_steps_probe", "n_eff", "settle_step",
    }
)  # fmt: skip


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Training batches per epoch (0 when Lightning does not know)."""
    n = trainer.num_training_batches
    return int(n) if isinstance(n, int) or (isinstance(n, float) and math.isfinite(n)) else 0


def plug_rho(plug: Any) -> float:
    """ρ of the whitening statistics (``norm.momentum``; for bn_warmup, its whitening's)."""
    for obj in (plug, getattr(plug, "whitening", None)):
        rho = getattr(obj, "momentum", None)
        if isinstance(rho, (int, float)) and not isinstance(rho, bool):
            return float(rho)
    return 0.0


def switch_step(plug: Any) -> int | None:
    """The step of a BN → whitening switch, ``None`` unless one happened (``norm=bn_warmup``
    with ``warmup_epochs`` > 0: with 0 it is whitening from the start, nothing switches)."""
    if not getattr(plug, "warmup_epochs", 0):
        return None
    return getattr(plug, "switched_at_step", None)


@checked(
    "callbacks.drift",
    dense_steps=required(at_least(0)),
    per_decade=required(POSITIVE_NUMBER),
    every_n_steps=at_least(1, "an integer >= 1 or null"),
    probe_size=at_least(0, "an integer >= 0 or null"),
    probe_batch_size=at_least(1, "an integer >= 1 or null"),
    probe_every=required(at_least(1)),
    probe_epochs=required(at_least(0)),
    settle_threshold=required(POSITIVE_NUMBER),
    settle_threshold_logvar=required(POSITIVE_NUMBER),
    lag_steps_max_se=required(POSITIVE_NUMBER),
    eps=required(POSITIVE_NUMBER),
    track_bn=FLAG,
    metrics=required(one_of("compact", "all")),
    arrays=FLAG,
    figures=FLAG,
    dirpath=Expect(str, lambda v: bool(v), "a folder"),
)
class DriftMonitor(pl.Callback):
    """Statistics drift, running-estimate lag, dead units and update sizes, per layer.

    Every argument is checked on each call (``errors.checked``, one line naming
    ``callbacks.drift.<arg>``) and by ``validate.check_targets`` before anything is built;
    ``null`` is allowed only where it has a meaning below.

    Args:
        dense_steps: every step below this one is instrumented.
        per_decade: log-spaced instrumented steps per decade after ``dense_steps``.
        every_n_steps: then every n-th step (``trainer.log_every_n_steps`` when ``None``).
        probe_size: examples in the fixed probe set (0: no probe), or ``None`` (auto): as many
            training batches as cost ~1 % of an epoch (a no-grad forward ≈ half a step), at
            least two half batches, at most 1024 examples (:func:`auto_probe`).
        probe_batch_size: probe batch size per rank (``None``: the training batch size).
        probe_every: probe period in steps during the first ``probe_epochs`` epochs; after
            that, and at the end of every epoch, one probe per epoch.
        settle_threshold, settle_threshold_logvar: drift over one epoch (std units, log-var)
            below which a layer counts as settled (``settle_step``).
        lag_steps_max_se: ``lag_steps`` is logged only when its standard error (steps) is
            below this.
        eps: added to variances (as BatchNorm's eps).
        track_bn: also watch BatchNorm inputs (their running statistics' lag).
        metrics: ``compact`` sends the main statistics (``COMPACT_STATS``) to the loggers,
            ``all`` every one; ``drift/summary.parquet`` always has them all.
        arrays: write the per-unit vectors to ``drift/arrays/epoch_<e>.npz``.
        figures: build the figures at the end of fit.
        dirpath: local folder of the artifacts (``None``: ``<trainer.default_root_dir>/drift``
            when the run has an MLflow logger, else nothing is written and the arrays stay in
            :attr:`array_files`).
    """

    def __init__(
        self,
        dense_steps: int = 10,
        per_decade: float = 10,
        every_n_steps: int | None = 50,
        probe_size: int | None = None,
        probe_batch_size: int | None = None,
        probe_every: int = 200,
        probe_epochs: int = 2,
        settle_threshold: float = 0.05,
        settle_threshold_logvar: float = 0.05,
        lag_steps_max_se: float = 2.0,
        eps: float = 1e-5,
        track_bn: bool = True,
        metrics: str = "compact",
        arrays: bool = True,
        figures: bool = True,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        self.dense_steps, self.per_decade = dense_steps, per_decade
        self.every_n_steps = every_n_steps
        self.probe_size, self.probe_batch_size = probe_size, probe_batch_size
        self.probe_every, self.probe_epochs = probe_every, probe_epochs
        self.settle_threshold = settle_threshold
        self.settle_threshold_logvar = settle_threshold_logvar
        self.lag_steps_max_se, self.eps, self.track_bn = lag_steps_max_se, float(eps), track_bn
        self.metrics, self.arrays, self.figures, self.dirpath = metrics, arrays, figures, dirpath
        # Steps other callbacks ask for (BN warm-up monitor): instrument, and probe.
        self.extra_steps: set[int] = set()
        self.extra_probe_steps: set[int] = set()
        self._restored: dict[str, Any] | None = None
        self._fitting = False
        self._reset()

    def _reset(self) -> None:
        """The state of one fit (also the state a checkpoint carries, :meth:`state_dict`)."""
        self.schedule = ds.Schedule(self.dense_steps, self.per_decade, self.every_n_steps or 50)
        self.collector: StatsCollector | None = None
        self.summary = ds.HostSummary(self.eps, self.lag_steps_max_se)
        self.record = outputs.Record()
        self.settle: dict[str, int | None] = {}
        self.n_probes = 0
        self._pending: int | None = None  # the step whose statistics are being gathered
        self._probe_now = False
        self._step = -1
        self._batch_size: int | None = None
        self._probe: list[torch.Tensor] | None = None
        self._probe_bs: int | None = None
        self._probe_examples: int | None = None
        self._check_modules = True
        self._done = False

    @property
    def by_step(self) -> dict[int, dict[str, float]]:
        """Every scalar recorded, by step: ``{step: {"drift/<layer>/<stat>": value}}``."""
        return self.record.by_step

    @property
    def array_files(self) -> dict[str, dict[str, Any]]:
        """Per-unit arrays kept in memory (no artifact folder): ``{"epoch_000.npz": {...}}``."""
        return self.record.array_files

    def table(self):
        """Every scalar recorded, long format: columns step, layer, stat, value."""
        return self.record.table()

    # -- setup ----------------------------------------------------------------------------
    @staticmethod
    def _model(pl_module: pl.LightningModule) -> nn.Module:
        return getattr(pl_module, "model", pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        every = self.every_n_steps or int(trainer.log_every_n_steps or 50)
        self.schedule = ds.Schedule(self.dense_steps, self.per_decade, every)
        self.collector = StatsCollector(
            self._model(pl_module),
            probe_batches=0,
            rho_default=plug_rho(getattr(pl_module, "norm", None)),
            track_bn=self.track_bn,
        )
        if self._restored is not None:  # resumed: continue the records of the checkpoint
            self._load(self._restored)
            self._restored = None
        self._fitting = True
        self.record.remember_layout(self.collector)

    def _ensure_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._probe is not None:
            return
        size, bs = self.probe_size, self.probe_batch_size or self._batch_size or 1
        if size is None:  # auto
            size, auto_bs = auto_probe(self._batch_size or 1, steps_per_epoch(trainer))
            size, bs = size * trainer.world_size, self.probe_batch_size or auto_bs
        seed = int(getattr(trainer.datamodule, "seed", 0) or 0)
        self._probe = probe_batches(trainer, int(size), bs, seed, pl_module.device)
        self._probe_bs, self._probe_examples = bs, len(self._probe) * bs * trainer.world_size
        c = self.collector
        assert c is not None
        if c.probe_batches != len(self._probe):
            c.probe_batches = len(self._probe)
            c.build()
        if self.probe_size != 0 and not self._probe:
            rank_zero_warn(
                f"callbacks.drift: no probe (probe_size={self.probe_size} gives no batch of "
                f"{bs} x {trainer.world_size} ranks, or the data has no x_train tensor)"
            )

    # -- the training loop ----------------------------------------------------------------
    def _wants(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, batch_idx: int
    ) -> tuple[bool, bool]:
        """(instrument, probe) for this step. Probes: every ``probe_every`` steps in the first
        ``probe_epochs`` epochs, on the last step of every epoch, at the BN → whitening switch
        and where another callback asked."""
        last_of_epoch = batch_idx == steps_per_epoch(trainer) - 1
        switch = switch_step(getattr(pl_module, "norm", None))
        probe = self.probe_size != 0 and (
            (trainer.current_epoch < self.probe_epochs and step % self.probe_every == 0)
            or last_of_epoch
            or step == switch
            or step in self.extra_probe_steps
        )
        return (step in self.schedule or step in self.extra_steps or probe), probe

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch != self.record.epoch and trainer.is_global_zero and self.arrays:
            # resumed from an epoch-end checkpoint: that epoch's arrays get their own file
            self.record.end_epoch(outputs.folder(self, trainer))
        self.record.epoch = epoch
        # A resumed epoch keeps the start it had (setdefault).
        self.record.epoch_starts.setdefault(epoch, trainer.global_step)
        self._check_modules = True  # norm=bn_warmup swaps modules at an epoch start

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        c, step = self.collector, trainer.global_step
        if c is None or step == self._step:  # not the first micro-batch of a new step
            return
        self._step = step
        if self._batch_size is None:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            self._batch_size = len(x)
        want, probe = self._wants(trainer, pl_module, step, batch_idx)
        if not want:
            return
        if probe:
            self._ensure_probe(trainer, pl_module)
            probe = bool(self._probe)
        if c.ensure_layout(check_modules=self._check_modules):
            self.record.remember_layout(c)
        self._check_modules = False
        if probe:
            # Before the step's forward: the weights are this step's, and no plug has armed
            # its own statistics yet (norm=whitening arms in the module's hook).
            c.probe(self._probe)  # type: ignore[arg-type]
        c.start_step()
        self._pending, self._probe_now = step, probe

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        c = self.collector
        if c is not None and self._pending is not None and c.on:
            c.on = False
            c.record_weights()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        c = self.collector
        if c is None or self._pending is None or trainer.global_step <= self._pending:
            return
        step, probe = self._pending, self._probe_now
        self._pending, self._probe_now = None, False
        c.on = False
        c.record_updates()
        if probe:  # the estimates after this step's update (BN: in the forward; whitening:
            c.snapshot_estimates()  # before the optimizer step), against the population now
        stats = c.gather(probe)
        if not trainer.is_global_zero:
            return
        # One probe bank is a global batch of probe_bs x ranks, a training step batch x ranks.
        scale = (self._probe_bs or 1) / max(self._batch_size or 1, 1) if probe else None
        self.n_probes += bool(probe)
        metrics = self.summary.summarise(step, stats, scale)
        metrics = {f"drift/{k}": v for k, v in metrics.items()}
        self.record.add(step, metrics)
        if self.arrays:
            self.record.add_arrays(step, stats, probe)
        self._log(trainer, metrics, step)

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        """Through the trainer's loggers: the run's one metric path (queue, retry, resume)."""
        if self.metrics == "compact":
            metrics = {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] in COMPACT_STATS}
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # -- epoch and fit end ----------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.arrays:
            self.record.end_epoch(outputs.folder(self, trainer))

    def meta(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """What the figures and readers need besides the scalars (``drift/meta.json``)."""
        plug = getattr(pl_module, "norm", None)
        if self.collector is not None:
            self.record.remember_layout(self.collector)
        info = self.record.layers
        return {
            "layers": list(info),
            "kinds": {n: d["kind"] for n, d in info.items()},
            "units": {n: d["units"] for n, d in info.items()},
            "rho": {n: d["rho"] for n, d in info.items() if "rho" in d},
            "estimates": {
                n: sorted(set(d["estimates"])) for n, d in info.items() if "estimates" in d
            },
            "epoch_starts": list(self.record.epoch_starts.values()),
            "steps_per_epoch": steps_per_epoch(trainer),
            "switch_step": switch_step(plug),
            "warmup_epochs": getattr(plug, "warmup_epochs", None),
            "norm": getattr(plug, "name", None),
            "settle_step": self.settle,
            "settle_threshold": self.settle_threshold,
            "settle_threshold_logvar": self.settle_threshold_logvar,
            "schedule": {
                "dense_steps": self.dense_steps,
                "per_decade": self.per_decade,
                "every_n_steps": self.schedule.every,
            },
            "probe": {
                "size": self._probe_examples,
                "setting": self.probe_size,
                "batch_size": self._probe_bs,
                "batches": len(self._probe or []),
                "every": self.probe_every,
                "epochs": self.probe_epochs,
                "count": self.n_probes,
            },
            "eps": self.eps,
        }

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once, at the end of fit or when it fails: settle steps, then the artifacts."""
        c = self.collector
        if c is None or self._done:
            return
        self._done, self._fitting = True, False
        c.on = False
        c.remove()
        if not trainer.is_global_zero:
            return
        last = max(self.by_step) if self.by_step else trainer.global_step
        self.settle = self.summary.settle_steps(
            steps_per_epoch(trainer), self.settle_threshold, self.settle_threshold_logvar
        )
        final = {
            f"drift/{name}/settle_step": float(s) if s is not None else -1.0
            for name, s in self.settle.items()
        }
        self.record.add(last, final)
        self._log(trainer, final, last)
        outputs.write(self, trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # A diverged (or interrupted) run keeps what was measured: the run most worth reading.
        self._finish(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fitting = False
        if self.collector is not None:
            self.collector.remove()

    # -- checkpoints: a resumed run continues the records, the drift rates and the shifts ----
    def state_dict(self) -> dict[str, Any]:
        c = self.collector
        return {
            "record": self.record.state_dict(),
            "summary": self.summary.state_dict(),
            "shifts": {t.name: t.shift.detach().cpu().clone() for t in c.tracked} if c else {},
            "n_probes": self.n_probes,
            "extra_steps": sorted(self.extra_steps),
            "extra_probe_steps": sorted(self.extra_probe_steps),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start (which starts a fresh record, then
        # applies this), or after it for strategies that restore after setup.
        if self._fitting:
            self._load(state_dict)
        else:
            self._restored = state_dict

    def _load(self, state: dict[str, Any]) -> None:
        self.record.load_state_dict(state["record"])
        self.summary.load_state_dict(state["summary"])
        self.n_probes = int(state["n_probes"])
        self.extra_steps.update(state["extra_steps"])
        self.extra_probe_steps.update(state["extra_probe_steps"])
        shifts = state["shifts"]
        for t in self.collector.tracked if self.collector is not None else []:
            if t.name in shifts and shifts[t.name].shape == t.shift.shape:
                t.shift.copy_(shifts[t.name])
