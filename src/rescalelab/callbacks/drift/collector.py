"""The hooks of the drift instruments and the statistics they gather on the device.

:class:`StatsCollector` registers, once, a forward pre-hook on every Conv2d/Linear (its input)
and every BatchNorm (its input: what ``running_mean``/``running_var`` estimate), and a forward
hook on the ReLU module that follows a Conv2d/Linear (dead units of that layer). The hooks are
gated by a Python flag; when it is up each one adds its input's sufficient statistics
(n, S1, S2 around a shift c, float32; ``stats.sufficient_stats``) into its layer's own small
device tensors. No ``.item()``, no host copy in the hooks. Bank 0 holds the training step,
banks 1..K the probe batches: sums, so banks add across micro-batches and across DDP ranks.

After the optimizer step :meth:`StatsCollector.gather` concatenates the summed tensors of
every layer, all-reduces them once across ranks, and copies them, with what is identical on
every rank and must not be summed (the shifts, the running estimates, the weight, gradient and
update norms), to the host in one transfer. It is independent of Lightning (unit-testable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from rescalelab.callbacks.drift import stats as ds


def estimates(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The running (μ, Var) that normalize this module's input, if it has any: BatchNorm's
    running statistics, or the whitening buffers ``rescale_mean``, ``rescale_var``."""
    if isinstance(module, _BatchNorm):
        if module.running_mean is not None and module.running_var is not None:
            return module.running_mean, module.running_var
        return None
    mu, var = getattr(module, "rescale_mean", None), getattr(module, "rescale_var", None)
    if isinstance(mu, torch.Tensor) and isinstance(var, torch.Tensor):
        return mu, var
    return None


def estimate_kind(module: nn.Module) -> str | None:
    """``"bn"``, ``"rescale"`` (whitening μ, Var) or ``None``."""
    if estimates(module) is None:
        return None
    return "bn" if isinstance(module, _BatchNorm) else "rescale"


def _updates(module: nn.Module) -> torch.Tensor | None:
    """How often the whitening statistics were updated (0: still μ = 0, Var = 1)."""
    n = getattr(module, "rescale_updates", None)
    return n if isinstance(n, torch.Tensor) else None


def _units(module: nn.Module) -> tuple[str, int, int]:
    if isinstance(module, nn.Conv2d):
        return "conv", module.in_channels, 1
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, -1
    return "bn", module.num_features, 1  # _BatchNorm


def _out_units(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.out_channels, 1
    return module.out_features, -1  # Linear


@dataclass(eq=False)
class Tracked:
    """One watched module and its device tensors.

    ``sums[b] = [n, S1(U), S2(U)]`` for bank b; ``active`` the per-unit sum of the following
    ReLU's outputs; ``est[0]``/``est[1]`` the running (μ, Var) in use when the training batch
    arrived and at probe time (after the step's update); ``ready`` their update counts (whitening;
    1 for BatchNorm).
    """

    name: str
    module: nn.Module
    kind: str  # "conv" | "linear" | "bn"
    units: int
    unit_dim: int
    shift: torch.Tensor
    sums: torch.Tensor
    estimates: str | None = None  # "bn" | "rescale" | None
    rho: float = 0.0  # EMA rate of the estimates (weight of a new batch), for the noise floor
    est: torch.Tensor | None = None  # [2 (arrival, probe), 2 (μ, Var), U]
    ready: torch.Tensor | None = None  # [2 (arrival, probe)]
    relu: nn.Module | None = None
    active: torch.Tensor | None = None
    a_dim: int = -1
    weight: nn.Parameter | None = None


class StatsCollector:
    """Hooks on a model and the statistics of its instrumented forwards (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        probe_batches: int = 0,
        rho_default: float = 0.0,
        track_bn: bool = True,
    ) -> None:
        self.model = model
        self.probe_batches = probe_batches
        self.rho_default = rho_default  # ρ of the whitening statistics (the plug's momentum)
        self.track_bn = track_bn
        self.on = False  # the gate every hook checks first
        self.bank = 0
        self.stale = False  # a hook saw a module whose layout changed (a BN→whitening switch)
        self.tracked: list[Tracked] = []
        self.weights: list[Tracked] = []
        self.norms = torch.zeros(0, 3)  # per weight: |g|², |w|², |Δw|²
        self._handles: list[Any] = []
        self._w_before: list[torch.Tensor] = []
        self._have_before = False
        self._sig: tuple = ()
        self.build()

    # -- layout ---------------------------------------------------------------------------
    def signature(self) -> tuple:
        return tuple(
            (n, id(m), estimate_kind(m)) for n, m in self.model.named_modules() if self._wanted(m)
        )

    def _wanted(self, m: nn.Module) -> bool:
        if isinstance(m, _BatchNorm):
            return self.track_bn
        return isinstance(m, (nn.Conv2d, nn.Linear))

    def _track(self, name: str, m: nn.Module, device: torch.device, shift: Any) -> Tracked:
        kind, units, unit_dim = _units(m)
        keep = isinstance(shift, torch.Tensor) and shift.shape == (units,)
        t = Tracked(
            name, m, kind, units, unit_dim,
            shift=shift.to(device) if keep else torch.zeros(units, device=device),
            sums=torch.zeros(1 + self.probe_batches, 1 + 2 * units, device=device),
            estimates=estimate_kind(m),
        )  # fmt: skip
        if t.estimates is not None:
            t.est = torch.zeros(2, 2, units, device=device)
            t.ready = torch.ones(2, device=device)
            if t.estimates == "bn":
                t.rho = float(m.momentum) if m.momentum is not None else 0.0
            else:
                t.rho = self.rho_default
        if kind != "bn":
            t.weight = m.weight
        return t

    def build(self) -> None:
        """(Re)discover the watched modules, allocate their tensors, register the hooks.

        The shifts of modules that keep their name and size survive a rebuild.
        """
        self.remove()
        old_shifts = {t.name: t.shift for t in self.tracked}
        try:
            device = next(self.model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        tracked: list[Tracked] = []
        last: Tracked | None = None  # the latest Conv2d/Linear still waiting for its ReLU
        for name, m in self.model.named_modules():
            if isinstance(m, nn.ReLU) and last is not None:
                units, last.a_dim = _out_units(last.module)
                last.relu, last.active = m, torch.zeros(units, device=device)
                last = None
            elif self._wanted(m):
                t = self._track(name, m, device, old_shifts.get(name))
                last = t if t.weight is not None else last
                tracked.append(t)
        self.tracked = tracked
        self.weights = [t for t in tracked if t.weight is not None]
        self.norms = torch.zeros(len(self.weights), 3, device=device)
        self._w_before, self._have_before = [], False
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
        u = t.units

        def hook(module: nn.Module, inputs: tuple) -> None:
            if not self.on:
                return
            x = inputs[0]
            if x.shape[t.unit_dim % x.ndim] != u:
                self.stale = True
                return
            n, s1, s2 = ds.sufficient_stats(x, t.shift, t.unit_dim)
            row = t.sums[self.bank]
            row[:1].add_(n)
            row[1 : 1 + u].add_(s1)
            row[1 + u :].add_(s2)
            if self.bank == 0:
                self._record_estimates(t, module, 0)

        return hook

    def _record_estimates(self, t: Tracked, module: nn.Module, slot: int) -> None:
        """The estimates in use now into ``t.est[slot]`` (0: the batch's arrival, 1: probe)."""
        est = estimates(module)
        if t.est is None or est is None or est[0].shape != (t.units,):
            # estimates appeared (whitening switched on) or went: relayout before the next step
            self.stale = self.stale or (est is None) != (t.est is None)
            return
        t.est[slot, 0].copy_(est[0])
        t.est[slot, 1].copy_(est[1])
        n = _updates(module)
        if n is not None and t.ready is not None:
            t.ready[slot].copy_(n)

    def _relu_hook(self, t: Tracked):
        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if not self.on or self.bank or t.active is None:  # training batches only
                return
            dim = t.a_dim % out.ndim
            if out.shape[dim] == t.active.shape[0]:
                y = out.detach()
                t.active.add_(y.float().sum(ds.unit_dims(y.ndim, dim)))

        return hook

    # -- the step -------------------------------------------------------------------------
    def start_step(self) -> None:
        """Zero bank 0 and open the gate."""
        for t in self.tracked:
            t.sums[0].zero_()
            if t.active is not None:
                t.active.zero_()
        self.bank = 0
        self.on = True

    def record_weights(self) -> None:
        """|g|² and |w|² now (after backward, before the optimizer step); keep w for Δw."""
        if not self.weights:
            return
        ws = [t.weight.detach() for t in self.weights]  # type: ignore[union-attr]
        grads = [
            t.weight.grad.detach() if t.weight.grad is not None else torch.zeros_like(w)  # type: ignore[union-attr]
            for t, w in zip(self.weights, ws)
        ]
        self.norms[:, 0].copy_(torch.stack(torch._foreach_norm(grads)) ** 2)
        self.norms[:, 1].copy_(torch.stack(torch._foreach_norm(ws)) ** 2)
        self.norms[:, 2].zero_()
        if len(self._w_before) != len(ws) or any(
            a.shape != b.shape for a, b in zip(self._w_before, ws)
        ):
            self._w_before = [w.clone() for w in ws]
        else:
            torch._foreach_copy_(self._w_before, ws)
        self._have_before = True

    def record_updates(self) -> None:
        """|Δw|² after the optimizer step."""
        if not self.weights or not self._have_before:
            return
        ws = [t.weight.detach() for t in self.weights]  # type: ignore[union-attr]
        torch._foreach_sub_(self._w_before, ws)
        self.norms[:, 2].copy_(torch.stack(torch._foreach_norm(self._w_before)) ** 2)
        self._have_before = False

    @torch.no_grad()
    def probe(self, batches: list[torch.Tensor]) -> None:
        """Forward ``batches`` (no grad, train mode, dropout off) into banks 1..K.

        Every buffer of the model is saved before and restored after, bit for bit, so BN's
        running statistics and ``num_batches_tracked`` (and any whitening statistics) are
        exactly as the training left them.
        """
        for t in self.tracked:
            t.sums[1:].zero_()
        saved = [b.detach().clone() for b in self.model.buffers()]
        dropout = [(m, m.training) for m in self.model.modules() if isinstance(m, _DropoutNd)]
        was_on, was_bank = self.on, self.bank
        try:
            for m, _ in dropout:
                m.eval()
            self.on = True
            for k, xb in enumerate(batches[: self.probe_batches]):
                self.bank = k + 1
                self.model(xb)
        finally:
            self.on, self.bank = was_on, was_bank
            for b, s in zip(self.model.buffers(), saved):
                b.copy_(s)
            for m, training in dropout:
                m.train(training)

    def snapshot_estimates(self) -> None:
        """Copy the running estimates as they stand now into the probe-time slots."""
        for t in self.tracked:
            if t.estimates:
                self._record_estimates(t, t.module, 1)

    # -- reduce, copy, unpack -------------------------------------------------------------
    def gather(self, probe: bool) -> dict[str, dict[str, Any]]:
        """All-reduce the banks in use (one collective when torch.distributed runs), copy
        everything to the host once, move each shift to the new mean; per-module numbers."""
        banks = (1 + self.probe_batches) if probe else 1
        summed = [t.sums[:banks] for t in self.tracked]
        summed += [t.active for t in self.tracked if t.active is not None]
        flat = torch.cat([s.reshape(-1) for s in summed]) if summed else self.norms.new_zeros(0)
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            torch.distributed.all_reduce(flat)
            reduced = flat.split([s.numel() for s in summed])
            torch._foreach_copy_(summed, [r.view_as(s) for r, s in zip(reduced, summed)])
        local = [t.shift for t in self.tracked]
        local += [t.est for t in self.tracked if t.est is not None]
        local += [t.ready for t in self.tracked if t.ready is not None]
        local.append(self.norms)
        # torch.cat copies: the shifts can move on right after.
        host = torch.cat([flat, *(x.reshape(-1) for x in local)]).cpu().numpy()
        for t in self.tracked:
            t.shift.add_(t.sums[0, 1 : 1 + t.units] / t.sums[0, :1].clamp_min(1.0))
        return self.unpack(host.astype(np.float64), banks)

    def unpack(self, host: np.ndarray, banks: int) -> dict[str, dict[str, Any]]:
        """Per-module numbers from the host copy made by :meth:`gather` (same order)."""
        parts = iter(np.split(host, np.cumsum(self._sizes(banks))[:-1]))
        sums = {t.name: next(parts).reshape(banks, -1) for t in self.tracked}
        active = {t.name: next(parts) for t in self.tracked if t.active is not None}
        shift = {t.name: next(parts) for t in self.tracked}
        est = {t.name: next(parts).reshape(2, 2, -1) for t in self.tracked if t.est is not None}
        ready = {t.name: next(parts) for t in self.tracked if t.ready is not None}
        norms = next(parts).reshape(-1, 3)
        out: dict[str, dict[str, Any]] = {}
        for t in self.tracked:
            u, b = t.units, sums[t.name]
            c = shift[t.name]
            d: dict[str, Any] = {"kind": t.kind, "units": u, "rho": t.rho, "shift": c, "n": b[0, 0]}
            if b[0, 0] > 0:
                d["m"], d["v"] = ds.moments(b[0, 0], b[0, 1 : 1 + u], b[0, 1 + u :], c)
            if t.name in est:
                (d["r_mean"], d["r_var"]), (d["rp_mean"], d["rp_var"]) = est[t.name]
                d["r_ready"], d["rp_ready"] = bool(ready[t.name][0] > 0), bool(ready[t.name][1] > 0)
            if t.name in active:
                d["active"] = active[t.name]
            out[t.name] = d
        for i, t in enumerate(self.weights):
            out[t.name]["grad2"], out[t.name]["w2"], out[t.name]["dw2"] = norms[i]
        if banks > 1:
            for t in self.tracked:
                self._unpack_probe(out[t.name], sums[t.name][1:], shift[t.name], t.units)
        return out

    def _sizes(self, banks: int) -> list[int]:
        sizes = [banks * t.sums.shape[1] for t in self.tracked]
        sizes += [t.active.numel() for t in self.tracked if t.active is not None]
        sizes += [t.units for t in self.tracked]
        sizes += [t.est.numel() for t in self.tracked if t.est is not None]
        sizes += [2 for t in self.tracked if t.ready is not None]
        return [*sizes, self.norms.numel()]

    @staticmethod
    def _unpack_probe(d: dict[str, Any], banks: np.ndarray, shift: np.ndarray, u: int) -> None:
        per = [(b[0], b[1 : 1 + u], b[1 + u :]) for b in banks if b[0] > 0]
        if per:
            d["probe"] = [ds.moments(n, s1, s2, shift) for n, s1, s2 in per]
            d["probe_pop"] = ds.moments(
                sum(x[0] for x in per), sum(x[1] for x in per), sum(x[2] for x in per), shift
            )
