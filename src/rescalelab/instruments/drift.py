"""``callbacks=drift``: how fast each layer's input statistics move, and how far the running
estimates used for normalization lag behind them (docs/drift.md).

The lecture's observation: in the first epochs E[x_i] and Var[x_i] of every layer's inputs
change very quickly, the running estimates (BN's running statistics, the whitening μ_i and α_i)
lag, and a stale estimate gives big unwarranted updates that push units into the flat region
of the ReLU. :class:`DriftMonitor` makes this visible for any model:

* Forward hooks, registered once, on every Conv2d/Linear (their input), every BatchNorm (its
  input: what ``running_mean``/``running_var`` estimate) and every ReLU module (dead units of
  the layer before it). They are gated by a Python flag; on an instrumented step (a
  :class:`~rescalelab.instruments.drift_stats.Schedule`) each one adds its input's sufficient
  statistics (n, S1, S2 around a shift, float32) into one preallocated device tensor. No
  ``.item()``, no host copy in the hooks.
* After the optimizer step that tensor is all-reduced once across DDP ranks, copied to the host
  once, summarised per layer into scalars ``drift/<layer>/<stat>`` and sent as one batched,
  asynchronous MLflow call. Per-unit vectors go to ``drift/arrays/epoch_<e>.npz``.
* A *probe* (a fixed set of training images, no augmentation, no grad, dropout off, every model
  buffer saved and restored bit-identically) gives near-noise-free population statistics μ*, σ*²
  every ``probe_every`` steps during the first ``probe_epochs`` epochs and at the end of every
  epoch; from it come ``lag_*_probe``, the sampling noise of one batch (noise floors, n_eff),
  the drift velocity (``lag_steps``) and, at the end, ``settle_step`` per layer.
* At the end of fit: ``drift/summary.parquet`` (every scalar, long format), ``drift/meta.json``
  and the figures ``drift/figures/*.png``. ``drift/overhead_frac`` is the callback's own time
  (hooks, host work, probes, artifacts) over the training-step time without it.

The monitor only reads: it never changes a parameter, a gradient, a buffer or an RNG state, so
a run with ``callbacks=drift`` logs the same training metrics as one without.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from rescalelab.errors import ConfigError
from rescalelab.instruments import drift_stats as ds

# ------------------------------------------------------------------------------------------
# Which modules are watched, and where their numbers live in the packed tensor


@dataclass
class Tracked:
    """One watched module and its slots in the packed tensor (offsets in floats)."""

    name: str
    module: nn.Module
    kind: str  # "conv" | "linear" | "bn"
    units: int
    unit_dim: int
    off: int  # [n, S1(U), S2(U)] inside each bank
    shift_off: int  # c(U) in the local segment
    estimates: str | None = None  # "bn" (running_mean/var) | "rescale" (whitening μ, Var) | None
    r_off: int = -1  # [r_mean(U), r_var(U)] in use when the batch arrived (local segment)
    rp_off: int = -1  # [r_mean(U), r_var(U)] at probe time (local segment)
    rho: float = 0.0  # EMA rate of the estimates (weight of a new batch), for the noise floor
    relu: nn.Module | None = None
    a_off: int = -1  # per-unit sum of the ReLU outputs (inside each bank)
    a_units: int = 0
    a_dim: int = 1
    weight: nn.Parameter | None = None
    w_index: int = -1  # row in the local [W, 3] block of (|g|², |w|², |Δw|²)
    shift: torch.Tensor | None = None


def _estimates(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The running (μ, Var) that normalize this module's input, if it has any."""
    if isinstance(module, _BatchNorm):
        if module.running_mean is not None and module.running_var is not None:
            return module.running_mean, module.running_var
        return None
    mu, var = getattr(module, "rescale_mean", None), getattr(module, "rescale_var", None)
    if isinstance(mu, torch.Tensor) and isinstance(var, torch.Tensor):
        return mu, var
    return None


def _estimate_kind(module: nn.Module) -> str | None:
    if _estimates(module) is None:
        return None
    return "bn" if isinstance(module, _BatchNorm) else "rescale"


def _units(module: nn.Module) -> tuple[str, int, int] | None:
    if isinstance(module, nn.Conv2d):
        return "conv", module.in_channels, 1
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, -1
    if isinstance(module, _BatchNorm):
        return "bn", module.num_features, 1
    return None


def _out_units(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.out_channels, 1
    return module.out_features, -1  # Linear


class StatsCollector:
    """Hooks and the packed statistics tensor, independent of Lightning (unit-testable).

    Layout of ``pack`` (float32, on the model's device)::

        bank 0 (the training step) | banks 1..K (probe batches) | local segment

    A bank holds, per watched module, ``[n, S1(U), S2(U)]`` and, per ReLU, the per-unit sum of
    its outputs: sums, so banks add across micro-batches and across ranks. The local segment
    holds what is identical on every rank and must not be summed: the shifts c, the running
    estimates and the weight/gradient/update norms.
    """

    def __init__(
        self,
        model: nn.Module,
        probe_batches: int = 0,
        rho_default: float = 0.0,
        track_bn: bool = True,
    ) -> None:
        self.model = model
        self.probe_batches = probe_batches
        self.rho_default = rho_default
        self.track_bn = track_bn
        self.on = False  # the gate every hook checks first
        self.bank = 0
        self.hook_seconds = 0.0
        self.stale = False  # a hook saw a module whose layout changed (e.g. a BN→whitening switch)
        self._handles: list[Any] = []
        self._w_before: list[torch.Tensor] = []
        self._snap_done = False
        self.build()

    # -- layout ---------------------------------------------------------------------------
    def signature(self) -> tuple:
        return tuple(
            (n, id(m), _estimate_kind(m)) for n, m in self.model.named_modules() if self._wanted(m)
        )

    def _wanted(self, m: nn.Module) -> bool:
        if isinstance(m, _BatchNorm):
            return self.track_bn
        return isinstance(m, (nn.Conv2d, nn.Linear))

    def build(self) -> None:
        """(Re)discover the watched modules, lay out the pack, register the hooks.

        The shifts of modules that keep their name and size survive a rebuild.
        """
        self.remove()
        old_shifts = {t.name: t.shift for t in getattr(self, "tracked", [])}
        try:
            device = next(self.model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        tracked: list[Tracked] = []
        relus: list[tuple[nn.Module, Tracked]] = []
        off = 0
        last: Tracked | None = None
        for name, m in self.model.named_modules():
            if isinstance(m, nn.ReLU) and last is not None and last.relu is None:
                last.relu = m
                relus.append((m, last))
                last = None
                continue
            if not self._wanted(m):
                continue
            kind, units, unit_dim = _units(m)  # type: ignore[misc]
            t = Tracked(name, m, kind, units, unit_dim, off=off, shift_off=-1)
            off += 1 + 2 * units
            t.estimates = _estimate_kind(m)
            if t.estimates == "bn":
                t.rho = float(m.momentum) if m.momentum is not None else 0.0
            elif t.estimates == "rescale":
                t.rho = float(getattr(m, "rescale_momentum", self.rho_default) or 0.0)
            if kind != "bn":
                t.weight = m.weight
                last = t
            tracked.append(t)
        for _, t in relus:
            t.a_units, t.a_dim = _out_units(t.module)
            t.a_off = off
            off += t.a_units
        self.bank_size = off
        local = (1 + self.probe_batches) * off
        loc = local
        for t in tracked:
            t.shift_off = loc
            loc += t.units
            if t.estimates:
                t.r_off, t.rp_off = loc, loc + 2 * t.units
                loc += 4 * t.units
        weights = [t for t in tracked if t.weight is not None]
        for i, t in enumerate(weights):
            t.w_index = i
        self.w_off = loc
        loc += 3 * len(weights)
        self.tracked, self.weights = tracked, weights
        self.pack = torch.zeros(loc, dtype=torch.float32, device=device)
        for t in tracked:
            prev = old_shifts.get(t.name)
            keep = prev is not None and prev.shape == (t.units,) and prev.device == device
            t.shift = prev if keep else self.pack.new_zeros(t.units)
        self._sig = self.signature()
        for t in tracked:
            self._handles.append(t.module.register_forward_pre_hook(self._input_hook(t)))
            if t.relu is not None:
                self._handles.append(t.relu.register_forward_hook(self._relu_hook(t)))

    def ensure_layout(self, check_modules: bool = False) -> bool:
        """Rebuild when a hook saw a changed module (``stale``) or, with ``check_modules``, when
        the model's watched modules changed; True if it did."""
        if self.stale or (check_modules and self.signature() != self._sig):
            self.build()
            self.stale = False
            return True
        return False

    def remove(self) -> None:
        """Remove every hook this collector registered."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- hooks ----------------------------------------------------------------------------
    def _input_hook(self, t: Tracked):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if not self.on:
                return
            t0 = time.perf_counter()
            x = inputs[0]
            if x.shape[t.unit_dim % x.ndim] != t.units:
                self.stale = True
                return
            base = self.bank * self.bank_size + t.off
            n, s1, s2 = ds.sufficient_stats(x, t.shift, t.unit_dim)
            p = self.pack
            p[base : base + 1].add_(n)
            p[base + 1 : base + 1 + t.units].add_(s1)
            p[base + 1 + t.units : base + 1 + 2 * t.units].add_(s2)
            if t.estimates and self.bank == 0:
                est = _estimates(module)
                if est is None:
                    self.stale = True
                else:  # the estimate in use when this batch arrives
                    p[t.r_off : t.r_off + t.units].copy_(est[0])
                    p[t.r_off + t.units : t.r_off + 2 * t.units].copy_(est[1])
            elif self.bank == 0 and _estimates(module) is not None:
                self.stale = True  # estimates appeared (whitening switched on): relayout next step
            self.hook_seconds += time.perf_counter() - t0

        return hook

    def _relu_hook(self, t: Tracked):
        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if not self.on or self.bank:  # dead units are read from training batches only
                return
            t0 = time.perf_counter()
            dim = t.a_dim % out.ndim
            if out.shape[dim] == t.a_units:
                y = out.detach()
                base = self.bank * self.bank_size + t.a_off
                self.pack[base : base + t.a_units].add_(y.float().sum(ds.unit_dims(y.ndim, dim)))
            self.hook_seconds += time.perf_counter() - t0

        return hook

    # -- the step -------------------------------------------------------------------------
    def start_step(self) -> None:
        """Zero bank 0 and open the gate."""
        self.pack[: self.bank_size].zero_()
        self.bank = 0
        self.on = True

    def record_weights(self) -> None:
        """|g|² and |w|² now (after backward, before the optimizer step); keep w for Δw."""
        if not self.weights:
            return
        block = self.pack[self.w_off :].view(-1, 3)
        ws = [t.weight.detach() for t in self.weights]  # type: ignore[union-attr]
        grads = [
            t.weight.grad.detach() if t.weight.grad is not None else torch.zeros_like(w)  # type: ignore[union-attr]
            for t, w in zip(self.weights, ws)
        ]
        block[:, 0].copy_(torch.stack(torch._foreach_norm(grads)) ** 2)
        block[:, 1].copy_(torch.stack(torch._foreach_norm(ws)) ** 2)
        block[:, 2].zero_()
        if len(self._w_before) != len(ws) or any(
            a.shape != b.shape for a, b in zip(self._w_before, ws)
        ):
            self._w_before = [w.clone() for w in ws]
        else:
            torch._foreach_copy_(self._w_before, ws)
        self._have_before = True

    def record_updates(self) -> None:
        """|Δw|² after the optimizer step."""
        if not self.weights or not getattr(self, "_have_before", False):
            return
        ws = [t.weight.detach() for t in self.weights]  # type: ignore[union-attr]
        torch._foreach_sub_(self._w_before, ws)
        block = self.pack[self.w_off :].view(-1, 3)
        block[:, 2].copy_(torch.stack(torch._foreach_norm(self._w_before)) ** 2)
        self._have_before = False

    @torch.no_grad()
    def probe(self, batches: list[torch.Tensor]) -> None:
        """Forward ``batches`` (no grad, train mode, dropout off) into banks 1..K.

        Every buffer of the model is saved before and restored after, bit for bit, so BN's
        running statistics and ``num_batches_tracked`` (and any whitening statistics) are
        exactly as the training left them.
        """
        self.pack[self.bank_size : (1 + self.probe_batches) * self.bank_size].zero_()
        saved = [b.detach().clone() for b in self.model.buffers()]
        dropout = [(m, m.training) for m in self.model.modules() if isinstance(m, _DropoutNd)]
        was_on, was_bank, hook_seconds = self.on, self.bank, self.hook_seconds
        try:
            for m, _ in dropout:
                m.eval()
            self.on = True
            for k, xb in enumerate(batches[: self.probe_batches]):
                self.bank = k + 1
                self.model(xb)
        finally:
            # The probe's own hook time is part of the probe's time, measured by the caller.
            self.on, self.bank, self.hook_seconds = was_on, was_bank, hook_seconds
            for b, s in zip(self.model.buffers(), saved):
                b.copy_(s)
            for m, training in dropout:
                m.train(training)

    def snapshot_estimates(self) -> None:
        """Copy the running estimates as they stand now into the probe-time slots."""
        p = self.pack
        for t in self.tracked:
            est = _estimates(t.module) if t.estimates else None
            if est is not None and est[0].shape == (t.units,):
                p[t.rp_off : t.rp_off + t.units].copy_(est[0])
                p[t.rp_off + t.units : t.rp_off + 2 * t.units].copy_(est[1])

    def reduce(self, probe: bool) -> torch.Tensor:
        """All-reduce the banks in use (one collective) when torch.distributed is running,
        snapshot the shifts into the local segment, then move each shift to the new mean."""
        banks = (1 + self.probe_batches) if probe else 1
        span = self.pack[: banks * self.bank_size]
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            torch.distributed.all_reduce(span)
        p = self.pack
        for t in self.tracked:
            p[t.shift_off : t.shift_off + t.units].copy_(t.shift)
            n = p[t.off : t.off + 1]
            t.shift.add_(p[t.off + 1 : t.off + 1 + t.units] / n.clamp_min(1.0))
        return self.pack

    def unpack(self, host: np.ndarray, probe: bool) -> dict[str, dict[str, Any]]:
        """Per-module numbers from a host copy of the reduced pack (float64)."""
        host = host.astype(np.float64)
        w = host[self.w_off :].reshape(-1, 3) if self.weights else None
        out: dict[str, dict[str, Any]] = {}
        for t in self.tracked:
            u = t.units
            shift = host[t.shift_off : t.shift_off + u]

            def bank(k: int, t: Tracked = t, u: int = u) -> tuple[float, np.ndarray, np.ndarray]:
                b = k * self.bank_size + t.off
                return host[b], host[b + 1 : b + 1 + u], host[b + 1 + u : b + 1 + 2 * u]

            d: dict[str, Any] = {"kind": t.kind, "units": u, "rho": t.rho, "shift": shift}
            n, s1, s2 = bank(0)
            d["n"] = n
            if n > 0:
                d["m"], d["v"] = ds.moments(n, s1, s2, shift)
            if t.estimates:
                d["r_mean"] = host[t.r_off : t.r_off + u]
                d["r_var"] = host[t.r_off + u : t.r_off + 2 * u]
                d["rp_mean"] = host[t.rp_off : t.rp_off + u]
                d["rp_var"] = host[t.rp_off + u : t.rp_off + 2 * u]
            if t.relu is not None:
                d["active"] = host[t.a_off : t.a_off + t.a_units]
            if w is not None and t.w_index >= 0:
                d["grad2"], d["w2"], d["dw2"] = w[t.w_index]
            if probe:
                per = [bank(k) for k in range(1, 1 + self.probe_batches)]
                per = [x for x in per if x[0] > 0]
                if per:
                    d["probe"] = [ds.moments(pn, ps1, ps2, shift) for pn, ps1, ps2 in per]
                    tn = sum(x[0] for x in per)
                    d["probe_pop"] = ds.moments(
                        tn, sum(x[1] for x in per), sum(x[2] for x in per), shift
                    )
            out[t.name] = d
        return out


# ------------------------------------------------------------------------------------------
# The probe set


def auto_probe(batch_size: int, steps_per_epoch: int, budget: float = 0.01) -> tuple[int, int]:
    """``(probe examples per rank, probe batch size)`` for ``probe_size: null``, from the
    training batch size per rank.

    A probe batch costs about half a training step (a no-grad forward), so ``budget`` of an
    epoch buys 2·budget·steps_per_epoch batches. At least two batches (the batch-to-batch spread
    gives the sampling noise): halves of the training batch when a whole one is over budget; at
    most 1024 examples. 78 steps per epoch at batch 128 (the synthetic default): 2 x 64;
    CIFAR-10's 391: 7 x 128.
    """
    whole = int(2 * budget * steps_per_epoch)
    if whole >= 2:
        k = max(2, min(whole, 1024 // max(batch_size, 1)))
        return k * batch_size, batch_size
    half = max(batch_size // 2, 1)
    return 2 * half, half


def probe_batches(
    trainer: pl.Trainer, size: int, batch_size: int, seed: int, device: torch.device
) -> list[torch.Tensor]:
    """A fixed set of ``size`` training inputs, this rank's share, in batches of ``batch_size``.

    The examples are a fixed random subset (a private generator, so no global RNG is touched)
    of the datamodule's ``tensors["x_train"]`` with its ``eval_transform`` (no augmentation), or
    else of the training dataset's items.
    """
    if size <= 0:
        return []
    rank, world = trainer.global_rank, trainer.world_size
    dm = getattr(trainer, "datamodule", None)
    g = torch.Generator().manual_seed(int(seed) * 7_777 + 17)
    tensors = getattr(dm, "tensors", None)
    if isinstance(tensors, dict) and "x_train" in tensors:
        x_all = tensors["x_train"]
        idx = torch.randperm(len(x_all), generator=g)[: min(size, len(x_all))]
        x = x_all[idx.to(x_all.device)]
        transform = dm.eval_transform() if hasattr(dm, "eval_transform") else None
        if transform is not None:
            x = transform(x, torch.Generator().manual_seed(int(seed)))
    else:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__"):
            return []
        idx = torch.randperm(len(dataset), generator=g)[:size].tolist()
        items = [dataset[i] for i in idx]
        x = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
    x = x.to(device)
    gb = batch_size * world
    out = []
    for k in range(len(x) // gb):
        block = x[k * gb : (k + 1) * gb]
        out.append(block[rank * batch_size : (rank + 1) * batch_size])
    return out


# ------------------------------------------------------------------------------------------
# The callback


@dataclass
class _ProbeHistory:
    steps: list[int] = field(default_factory=list)
    means: list[np.ndarray] = field(default_factory=list)
    variances: list[np.ndarray] = field(default_factory=list)


# What goes to MLflow as metrics on every instrumented step with ``metrics: compact`` (each value
# costs ~0.1 ms of SQLite work); every statistic, always, goes to drift/summary.parquet.
COMPACT_STATS = frozenset(
    {
        "mean_z", "logvar_med", "drift_mean", "drift_logvar", "dead_frac", "grad_norm",
        "update_ratio", "lag_mean_z", "lag_logvar", "noise_floor", "lag_steps",
        "lag_mean_z_probe", "lag_logvar_probe", "lag_steps_probe", "n_eff", "settle_step",
        "overhead_frac",
    }
)  # fmt: skip


MODES = ("buffered", "async", "sync")  # MetricSink's modes (tracking/artifacts.py)
ARRAYS_MB = 64  # per-unit arrays kept in memory before an upload (else: at the end of fit)


def _check(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"callbacks.{key}={value!r} is invalid: expected {allowed}")


class DriftMonitor(pl.Callback):
    """Statistics drift, running-estimate lag, dead units and update sizes, per layer.

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
        metrics: ``compact`` sends the main statistics (``COMPACT_STATS``) to MLflow, ``all``
            every one; ``drift/summary.parquet`` always has them all.
        log_mode: ``buffered`` (written together at least every ``flush_seconds`` and at the end
            of fit), ``async`` (one asynchronous call per step) or ``sync``; see
            :class:`~rescalelab.tracking.artifacts.MetricSink`.
        flush_seconds: the longest a buffered value waits before it is written.
        arrays: write the per-unit vectors to ``drift/arrays/epoch_<e>.npz``.
        figures: build the figures at the end of fit.
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
        log_mode: str = "buffered",
        flush_seconds: float = 60.0,
        arrays: bool = True,
        figures: bool = True,
    ) -> None:
        super().__init__()

        def integer(lo: int, none_ok: bool = False):
            return lambda v: (
                (none_ok and v is None)
                or (isinstance(v, int) and not isinstance(v, bool) and v >= lo)
            )

        def positive(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

        checks = [
            ("dense_steps", dense_steps, integer(0), "an integer >= 0"),
            ("per_decade", per_decade, positive, "a number > 0"),
            ("every_n_steps", every_n_steps, integer(1, True), "an integer >= 1 or null"),
            ("probe_size", probe_size, integer(0, True), "an integer >= 0 or null"),
            ("probe_batch_size", probe_batch_size, integer(1, True), "an integer >= 1 or null"),
            ("probe_every", probe_every, integer(1), "an integer >= 1"),
            ("probe_epochs", probe_epochs, integer(0), "an integer >= 0"),
            ("settle_threshold", settle_threshold, positive, "a number > 0"),
            ("settle_threshold_logvar", settle_threshold_logvar, positive, "a number > 0"),
            ("lag_steps_max_se", lag_steps_max_se, positive, "a number > 0"),
            ("eps", eps, positive, "a number > 0"),
            ("metrics", metrics, lambda v: v in ("compact", "all"), "one of: compact, all"),
            ("log_mode", log_mode, lambda v: v in MODES, "one of: buffered, async, sync"),
            ("flush_seconds", flush_seconds, positive, "a number > 0"),
        ]
        for key, value, ok, allowed in checks:
            _check(f"drift.{key}", value, ok(value), allowed)
        self.dense_steps, self.per_decade = dense_steps, per_decade
        self.every_n_steps = every_n_steps
        self.probe_size, self.probe_batch_size = probe_size, probe_batch_size
        self.probe_every, self.probe_epochs = probe_every, probe_epochs
        self.settle_threshold = settle_threshold
        self.settle_threshold_logvar = settle_threshold_logvar
        self.lag_steps_max_se, self.eps, self.track_bn = lag_steps_max_se, float(eps), track_bn
        self.metrics, self.log_mode, self.flush_seconds = metrics, log_mode, flush_seconds
        self.arrays, self.figures = arrays, figures
        # Steps other callbacks ask for (BN warm-up monitor): instrument, and probe.
        self.extra_steps: set[int] = set()
        self.extra_probe_steps: set[int] = set()
        self.collector: StatsCollector | None = None
        self.rows: list[tuple[int, str, str, float]] = []
        self.by_step: dict[int, dict[str, float]] = {}
        self.settle: dict[str, int | None] = {}

    # -- setup ----------------------------------------------------------------------------
    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        return getattr(pl_module, "model", pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.every_n_steps or int(getattr(trainer, "log_every_n_steps", 50) or 50)
        self.schedule = ds.Schedule(self.dense_steps, self.per_decade, every)
        self.sink = None
        self._t_cb = self._t_inside = self._t_train = self._t_figures = 0.0
        self._t_probe = self._t_host = self._t_artifacts = 0.0
        self._step_t0: float | None = None
        self._pending: int | None = None
        self._step = -1
        self._probe_now = False
        self._batch_size: int | None = None
        self._probe: list[torch.Tensor] | None = None
        self._prev: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        self._noise: dict[str, tuple[float, float]] = {}
        self._probes: dict[str, _ProbeHistory] = defaultdict(_ProbeHistory)
        self._epoch_arrays: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self._array_files: dict[str, dict[str, np.ndarray]] = {}
        self._array_bytes = 0
        self._epoch_starts: list[int] = []
        self._check_modules = True
        self._layers: dict[str, dict[str, Any]] = {}
        self._n_probes = 0
        self.rows, self.by_step, self.settle = [], {}, {}
        t0 = time.perf_counter()
        self.collector = StatsCollector(
            self._model(pl_module),
            probe_batches=0,
            rho_default=_plug_rho(getattr(pl_module, "norm", None)),
            track_bn=self.track_bn,
        )
        self._remember_layout()
        self._t_cb += time.perf_counter() - t0

    def _ensure_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._probe is not None:
            return
        size, bs = self.probe_size, self.probe_batch_size or self._batch_size or 1
        if size is None:  # auto
            size, auto_bs = auto_probe(self._batch_size or 1, _steps_per_epoch(trainer))
            size, bs = size * trainer.world_size, self.probe_batch_size or auto_bs
        dm = getattr(trainer, "datamodule", None)
        seed = int(getattr(dm, "seed", 0) or 0)
        device = pl_module.device
        self._probe = probe_batches(trainer, int(size), bs, seed, device)
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
        last_of_epoch = batch_idx == _steps_per_epoch(trainer) - 1
        switch = getattr(getattr(pl_module, "norm", None), "switched_at_step", None)
        probe = self.probe_size != 0 and (
            (trainer.current_epoch < self.probe_epochs and step % self.probe_every == 0)
            or last_of_epoch
            or step == switch
            or step in self.extra_probe_steps
        )
        return (step in self.schedule or step in self.extra_steps or probe), probe

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_starts.append(trainer.global_step)
        self._check_modules = True  # norm=bn_warmup swaps modules at an epoch start

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        t0 = time.perf_counter()
        self._step_t0 = t0
        c = self.collector
        if c is None:
            return
        step = trainer.global_step
        if step != self._step:  # first micro-batch of a new optimizer step
            self._step = step
            if self._batch_size is None:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                self._batch_size = len(x)
            want, probe = self._wants(trainer, pl_module, step, batch_idx)
            if want:
                if probe:
                    self._ensure_probe(trainer, pl_module)
                    probe = bool(self._probe)
                if c.ensure_layout(check_modules=self._check_modules):
                    self._remember_layout()
                self._check_modules = False
                if probe:
                    # Before the step's forward: the weights are this step's, and no plug has
                    # armed its own statistics yet (norm=whitening arms in the module's hook).
                    tp = time.perf_counter()
                    c.probe(self._probe)  # type: ignore[arg-type]
                    self._t_probe += time.perf_counter() - tp
                c.start_step()
                self._pending, self._probe_now = step, probe
        dt = time.perf_counter() - t0
        self._t_cb += dt
        self._t_inside += dt

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        c = self.collector
        if c is None or self._pending is None or not c.on:
            return
        t0 = time.perf_counter()
        c.on = False
        c.record_weights()
        dt = time.perf_counter() - t0
        self._t_cb += dt
        self._t_inside += dt

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        t0 = time.perf_counter()
        if self._step_t0 is not None:
            self._t_train += t0 - self._step_t0
            self._step_t0 = None
        c = self.collector
        if c is None or self._pending is None or trainer.global_step <= self._pending:
            self._t_cb += time.perf_counter() - t0
            return
        step, probe = self._pending, self._probe_now
        self._pending, self._probe_now = None, False
        c.on = False
        c.record_updates()
        if probe:  # the estimates after this step's update (BN: in the forward; whitening: before
            c.snapshot_estimates()  # the optimizer step), against the population at its weights
        pack = c.reduce(probe)
        if trainer.is_global_zero:
            host = pack.cpu().numpy()
            metrics = self._summarise(step, c.unpack(host, probe), probe, trainer)
            metrics["drift/overhead_frac"] = self.overhead_frac(extra=time.perf_counter() - t0)
            self._record(step, metrics)
            if self.sink is None:
                self.sink = _sink(trainer.logger, self.log_mode, self.flush_seconds)
            self.sink.log(self._to_log(metrics), step)
        dt = time.perf_counter() - t0
        self._t_cb += dt
        self._t_host += dt

    def _hook_seconds(self) -> float:
        c = self.collector
        return c.hook_seconds if c is not None else getattr(self, "_hooks_final", 0.0)

    def _to_log(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.metrics == "all":
            return metrics
        return {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] in COMPACT_STATS}

    def overhead_frac(self, extra: float = 0.0) -> float:
        """Callback time (hooks, host work, probes, artifacts) / training time without it."""
        hooks = self._hook_seconds()
        mine = self._t_cb + extra + hooks
        base = self._t_train - self._t_inside - hooks
        return mine / base if base > 0 else float("nan")

    # -- host summaries -------------------------------------------------------------------
    def _summarise(
        self, step: int, stats: dict[str, dict[str, Any]], probe: bool, trainer: pl.Trainer
    ) -> dict[str, float]:
        eps = self.eps
        out: dict[str, float] = {}
        # One probe bank is a global batch of probe_bs x ranks, a training step batch x ranks.
        scale = self._probe_bs / max(self._batch_size or 1, 1) if probe else 1.0
        if probe:
            self._n_probes += 1
            for name, d in stats.items():
                if "probe_pop" not in d:
                    continue
                mu, var = d["probe_pop"]
                means = np.stack([m for m, _ in d["probe"]])
                variances = np.stack([v for _, v in d["probe"]])
                noise = ds.batch_noise(means, variances, eps)
                if noise is not None:  # one *training* batch: noise ∝ 1/batch size
                    self._noise[name] = (noise[0] * scale, noise[1] * scale)
                    out[f"drift/{name}/n_eff"] = 1.0 / max(self._noise[name][0], 1e-30)
                h = self._probes[name]
                h.steps.append(step)
                h.means.append(mu)
                h.variances.append(var)
                if self.arrays:
                    a = self._epoch_arrays[name]
                    a["probe_steps"].append(step)
                    a["probe_mean"].append(mu.astype(np.float32))
                    a["probe_var"].append(var.astype(np.float32))
                if d.get("rp_mean") is not None:
                    out.update(
                        {
                            f"drift/{name}/{k}": v
                            for k, v in ds.probe_lag(
                                d["rp_mean"], d["rp_var"], mu, var, eps
                            ).items()
                        }
                    )
                    u = self._velocity(name)
                    if u is not None:
                        delta = (mu - d["rp_mean"]) / np.sqrt(var + eps)
                        sm = self._noise.get(name, (0.0, 0.0))[0]
                        k = max(len(self._probe or []), 1)
                        sd = math.sqrt(sm * (d["rho"] / (2 - d["rho"]) + 1.0 / k))
                        ls, se = ds.lag_steps(delta, u, sd)
                        if se <= self.lag_steps_max_se:
                            out[f"drift/{name}/lag_steps_probe"] = ls
        for name, d in stats.items():
            if d["n"] <= 0 or "m" not in d:
                continue
            m, v = d["m"], d["v"]
            key = f"drift/{name}/"
            for k, val in ds.input_summary(m, v, eps).items():
                out[key + k] = val
            sm, slv = self._noise.get(name, (1.0 / d["n"], 2.0 / d["n"]))
            prev = self._prev.get(name)
            if prev is not None and prev[1].shape == m.shape and step > prev[0]:
                dm, dlv = ds.drift_rates(m, v, prev[1], prev[2], step - prev[0], eps, sm, slv)
                out[key + "drift_mean"], out[key + "drift_logvar"] = dm, dlv
            self._prev[name] = (step, m, v)
            if d.get("r_mean") is not None:
                lg = ds.lag(m, v, d["r_mean"], d["r_var"], eps)
                floor = ds.noise_floor(sm, d["rho"])
                floor_lv = ds.noise_floor(slv, d["rho"])
                out.update({key + k: val for k, val in lg.items()})
                out[key + "noise_floor"] = floor
                out[key + "noise_floor_logvar"] = floor_lv
                out[key + "lag_mean_z_excess"] = ds.excess(lg["lag_mean_z"], floor)
                out[key + "lag_logvar_excess"] = ds.excess(lg["lag_logvar"], floor_lv)
                u = self._velocity(name)
                if u is not None:
                    delta = (m - d["r_mean"]) / np.sqrt(d["r_var"] + eps)
                    ls, se = ds.lag_steps(delta, u, floor)
                    if se <= self.lag_steps_max_se:
                        out[key + "lag_steps"] = ls
            if "active" in d:
                out[key + "dead_frac"] = ds.dead_fraction(d["active"])
            if "grad2" in d:
                out[key + "grad_norm"] = math.sqrt(d["grad2"])
                if d["w2"] > 0:
                    out[key + "update_ratio"] = math.sqrt(d["dw2"] / d["w2"])
            if self.arrays:
                a = self._epoch_arrays[name]
                a["steps"].append(step)
                a["m"].append(m.astype(np.float32))
                a["v"].append(v.astype(np.float32))
                if d.get("r_mean") is not None:
                    a["r_mean"].append(d["r_mean"].astype(np.float32))
                    a["r_var"].append(d["r_var"].astype(np.float32))
                if "active" in d:
                    a["dead"].append(d["active"] <= 0)
        return out

    def _velocity(self, name: str) -> np.ndarray | None:
        """d μ*/dt / σ* per step, from the two latest probes."""
        h = self._probes.get(name)
        if h is None or len(h.steps) < 2 or h.steps[-1] <= h.steps[-2]:
            return None
        if h.means[-1].shape != h.means[-2].shape:
            return None
        dt = h.steps[-1] - h.steps[-2]
        return (h.means[-1] - h.means[-2]) / dt / np.sqrt(h.variances[-1] + self.eps)

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        self.by_step.setdefault(step, {}).update(metrics)
        for k, v in metrics.items():
            parts = k.split("/")
            layer = "/".join(parts[1:-1]) if len(parts) > 2 else ""
            self.rows.append((step, layer, parts[-1], float(v)))

    # -- epoch and fit end ----------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        t0 = time.perf_counter()
        if trainer.is_global_zero and self.arrays and self._epoch_arrays:
            self._flush_arrays(trainer, trainer.current_epoch)
        dt = time.perf_counter() - t0
        self._t_cb += dt
        self._t_artifacts += dt

    def _flush_arrays(self, trainer: pl.Trainer, epoch: int, write: bool = False) -> None:
        """Stack the epoch's per-unit vectors into ``epoch_<e>.npz``; the files are uploaded
        together at the end of fit (or once they hold more than ``ARRAYS_MB``)."""
        from rescalelab.tracking.artifacts import log_npz_files

        arrays: dict[str, np.ndarray] = {}
        for name, a in self._epoch_arrays.items():
            for k, vals in a.items():
                if not vals:
                    continue
                try:
                    arrays[f"{name}/{k}"] = np.stack([np.asarray(v) for v in vals])
                except ValueError:  # the layer changed size mid-epoch: keep each step apart
                    for i, v in enumerate(vals):
                        arrays[f"{name}/{k}/{i}"] = np.asarray(v)
        self._epoch_arrays.clear()
        if arrays:
            self._array_files[f"epoch_{epoch:03d}.npz"] = arrays
            self._array_bytes += sum(a.nbytes for a in arrays.values())
        due = write or self._array_bytes > ARRAYS_MB * 2**20
        # Without an MLflow logger nothing is uploaded: they stay in ``array_files``.
        if self._array_files and due and log_npz_files(trainer.logger, self._array_files, "drift/arrays"):  # fmt: skip
            self._array_files, self._array_bytes = {}, 0

    @property
    def array_files(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-unit arrays not uploaded (yet): ``{"epoch_000.npz": {"<layer>/m": ...}}``."""
        return self._array_files

    def _remember_layout(self) -> None:
        """Keep every module ever watched (a BN → whitening switch removes the BNs)."""
        c = self.collector
        for t in c.tracked if c is not None else []:
            if t.name not in self._layers:
                self._layers[t.name] = {"kind": t.kind, "units": t.units}
            if t.estimates:
                self._layers[t.name].setdefault("estimates", []).append(t.estimates)
                self._layers[t.name]["rho"] = t.rho

    def meta(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        plug = getattr(pl_module, "norm", None)
        self._remember_layout()
        info = self._layers
        return {
            "layers": list(info),
            "kinds": {n: d["kind"] for n, d in info.items()},
            "units": {n: d["units"] for n, d in info.items()},
            "rho": {n: d["rho"] for n, d in info.items() if "rho" in d},
            "estimates": {
                n: sorted(set(d["estimates"])) for n, d in info.items() if "estimates" in d
            },
            "epoch_starts": self._epoch_starts,
            "steps_per_epoch": _steps_per_epoch(trainer),
            "switch_step": getattr(plug, "switched_at_step", None),
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
                "size": getattr(self, "_probe_examples", None),
                "setting": self.probe_size,
                "batch_size": getattr(self, "_probe_bs", None),
                "batches": len(self._probe or []),
                "every": self.probe_every,
                "epochs": self.probe_epochs,
                "count": self._n_probes,
            },
            "eps": self.eps,
            "overhead_frac": self.overhead_frac(),
            "seconds": {
                "train_steps": self._t_train,
                "callback": self._t_cb,
                "hooks": self._hook_seconds(),
                "probes": self._t_probe,
                "host": self._t_host,
                "arrays": self._t_artifacts,
                "figures": self._t_figures,
            },
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        c = self.collector
        if c is None:
            return
        t0 = time.perf_counter()
        c.remove()
        self._hooks_final = c.hook_seconds
        if not trainer.is_global_zero:
            return
        last = max(self.by_step) if self.by_step else trainer.global_step
        final: dict[str, float] = {"drift/overhead_frac": self.overhead_frac()}
        for name, h in self._probes.items():
            s = ds.settle_step(
                h.steps, h.means, h.variances, max(_steps_per_epoch(trainer), 1),
                self.settle_threshold, self.settle_threshold_logvar, self.eps,
            )  # fmt: skip
            self.settle[name] = s
            final[f"drift/{name}/settle_step"] = float(s) if s is not None else -1.0
        self._record(last, final)
        if self.sink is None:
            self.sink = _sink(trainer.logger, self.log_mode, self.flush_seconds)
        self.sink.log(final, last)
        # Once, after training (not step time): arrays upload, table, figures, metric writes.
        if self.arrays:
            self._flush_arrays(trainer, trainer.current_epoch, write=True)
        self.write_outputs(trainer, pl_module)
        self.sink.wait()
        end = {"drift/end_of_fit_seconds": time.perf_counter() - t0}
        self._record(last, end)
        _sink(trainer.logger, "sync").log(end, last)

    def write_outputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``drift/summary.parquet``, ``drift/meta.json`` and the figures."""
        from rescalelab.tracking.artifacts import log_figure, log_json, log_table

        t0 = time.perf_counter()
        table = self.table()
        meta = self.meta(trainer, pl_module)
        log_table(trainer.logger, table, "drift/summary.parquet")
        log_json(trainer.logger, meta, "drift/meta.json")
        if self.figures and len(table):
            from rescalelab.instruments import figures

            for name, fig in figures.run_figures(table, meta).items():
                log_figure(trainer.logger, fig, f"drift/figures/{name}.png")
                figures.close(fig)
        self._t_figures = time.perf_counter() - t0

    def table(self):
        """Every logged scalar, long format: columns step, layer, stat, value."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["step", "layer", "stat", "value"])

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.collector is not None:
            self.collector.remove()
        if getattr(self, "sink", None) is not None:
            with contextlib.suppress(Exception):  # the run is failing already: keep its error
                self.sink.wait()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.collector is not None:
            self.collector.remove()


def _plug_rho(plug: Any) -> float:
    """ρ of the whitening statistics (``norm.momentum``; for bn_warmup, its whitening's)."""
    for obj in (plug, getattr(plug, "whitening", None)):
        rho = getattr(obj, "momentum", None)
        if isinstance(rho, (int, float)) and not isinstance(rho, bool):
            return float(rho)
    return 0.0


def _steps_per_epoch(trainer: pl.Trainer) -> int:
    n = trainer.num_training_batches
    return int(n) if isinstance(n, int) or (isinstance(n, float) and math.isfinite(n)) else 0


def _sink(logger: Any, mode: str = "buffered", seconds: float = 60.0):
    from rescalelab.tracking.artifacts import MetricSink

    return MetricSink(logger, mode, max_values=20_000, max_seconds=seconds)
