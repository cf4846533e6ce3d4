"""The statistics of the drift instruments (no Lightning, no MLflow): pure functions, the
schedule of instrumented steps, and :class:`HostSummary`, which turns one step's unpacked
statistics into the scalars ``<layer>/<stat>``.

Notation (the lecture's): a layer reads inputs x_i, one *unit* i per input feature of a Linear,
per input channel of a Conv2d or BatchNorm. On an instrumented step the hooks reduce x to
sufficient statistics around a shift c_i (the last logged mean, which avoids cancellation when
|E x_i| >> std x_i)::

    n,   S1_i = Σ (x_i − c_i),   S2_i = Σ (x_i − c_i)²          (sums over batch and H·W)

They add across micro-batches and across DDP ranks. From them the minibatch mean and the biased
variance are ``m_i = c_i + S1_i/n`` and ``v_i = S2_i/n − (S1_i/n)²``.

The *running estimates* r_i are what normalizes (or would normalize) x_i: BatchNorm's
``running_mean``/``running_var`` during BN, the whitening μ_i and Var_i (α_i = 1/sqrt(Var_i+eps))
during whitening. Their *lag* is measured by whitening the data with them::

    lag_mean_z = RMS_i (m_i − r_mean_i) / sqrt(r_var_i + eps)        (std units, ideal 0)
    lag_logvar = RMS_i log((v_i + eps) / (r_var_i + eps))            (ideal 0)

Even a perfect estimate shows sampling noise: with s² = Var(m_i)/σ_i² = 1/n_eff for one batch
and an EMA of rate ρ independent of the batch, E[lag_mean_z²] = s²·(1 + ρ/(2−ρ)) = 2s²/(2−ρ),
the *noise floor*. ``drift_mean`` and ``drift_logvar`` are per-step rates between two logging
points, with the sampling noise of both ends removed from their square.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# ----------------------------------------------------------------------------------------
# On the device: what the hooks compute


def unit_dims(ndim: int, unit_dim: int) -> tuple[int, ...]:
    """The dimensions reduced for a tensor of ``ndim`` dims whose units lie along ``unit_dim``."""
    u = unit_dim % ndim
    return tuple(d for d in range(ndim) if d != u)


def sufficient_stats(
    x: torch.Tensor, shift: torch.Tensor, unit_dim: int
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(n, S1, S2)`` of ``x`` around ``shift`` (one value per unit), in float32.

    Uses plain sums, not ``torch.var_mean`` (slower on CPU for these shapes).
    """
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    u = unit_dim % x.ndim
    units = x.shape[u]
    view = [1] * x.ndim
    view[u] = units
    d = x - shift.view(view)
    dims = unit_dims(x.ndim, u)
    s1 = d.sum(dims)
    return x.numel() // max(units, 1), s1, d.square_().sum(dims)


# ----------------------------------------------------------------------------------------
# On the host: summaries of the unpacked statistics (numpy, float64)


def moments(
    n: float, s1: np.ndarray, s2: np.ndarray, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Minibatch mean ``m = c + S1/n`` and biased variance ``v = S2/n − (S1/n)²`` (>= 0)."""
    d = s1 / n
    return shift + d, np.maximum(s2 / n - d * d, 0.0)


def rms(a: np.ndarray) -> float:
    """Root mean square over units (NaN for an empty vector)."""
    a = np.asarray(a, dtype=np.float64)
    return float(np.sqrt(np.mean(a * a))) if a.size else float("nan")


def input_summary(m: np.ndarray, v: np.ndarray, eps: float) -> dict[str, float]:
    """``mean_z`` = RMS_i m_i/sqrt(v_i+eps) (how centred); median and IQR of log(v_i+eps)."""
    lv = np.sort(np.log(v + eps))
    q25, q50, q75 = (
        float(np.interp(q * (lv.size - 1), np.arange(lv.size), lv)) for q in (0.25, 0.5, 0.75)
    )
    return {
        "mean_z": rms(m / np.sqrt(v + eps)),
        "logvar_med": float(q50),
        "logvar_iqr": float(q75 - q25),
    }


def drift_rates(
    m: np.ndarray,
    v: np.ndarray,
    m0: np.ndarray,
    v0: np.ndarray,
    steps: int,
    eps: float,
    noise_mean: float = 0.0,
    noise_logvar: float = 0.0,
) -> tuple[float, float]:
    """Per-step drift between two logging points ``steps`` apart, noise removed.

    ``drift_mean``   = sqrt(max(0, RMS_i²[(m_i − m0_i)/σ̄_i] − 2·noise_mean)) / steps,
    ``drift_logvar`` = sqrt(max(0, RMS_i²[log v_i − log v0_i] − 2·noise_logvar)) / steps,

    with σ̄_i² = (v_i + v0_i)/2 + eps. ``noise_mean`` = Var(m_i)/σ_i² and ``noise_logvar`` =
    Var(log v_i) of *one* batch: both ends carry that much sampling noise, so subtracting
    twice it from the squared RMS makes the squared drift unbiased.
    """
    sd = np.sqrt((v + v0) / 2 + eps)
    raw_m = np.mean(((m - m0) / sd) ** 2)
    raw_lv = np.mean((np.log(v + eps) - np.log(v0 + eps)) ** 2)
    dm = math.sqrt(max(0.0, float(raw_m) - 2 * noise_mean)) / steps
    dlv = math.sqrt(max(0.0, float(raw_lv) - 2 * noise_logvar)) / steps
    return dm, dlv


def lag(
    m: np.ndarray, v: np.ndarray, r_mean: np.ndarray, r_var: np.ndarray, eps: float
) -> dict[str, float]:
    """The whitening residual of the data under the running estimates (module docstring).

    ``lag_logvar_signed`` is the median of log((v+eps)/(r_var+eps)): > 0 when the estimate
    underestimates the variance (the whitened input is too wide), < 0 when it overestimates it.
    """
    z = (m - r_mean) / np.sqrt(r_var + eps)
    lr = np.log((v + eps) / (r_var + eps))
    return {
        "lag_mean_z": rms(z),
        "lag_logvar": rms(lr),
        "lag_logvar_signed": float(np.median(lr)),
    }


def probe_lag(
    r_mean: np.ndarray, r_var: np.ndarray, mu: np.ndarray, var: np.ndarray, eps: float
) -> dict[str, float]:
    """Lag against near-noise-free population statistics μ*, σ*² from the probe:
    RMS_i (r_mean_i − μ*_i)/σ*_i and RMS_i log(r_var_i/σ*_i²)."""
    return {
        "lag_mean_z_probe": rms((r_mean - mu) / np.sqrt(var + eps)),
        "lag_logvar_probe": rms(np.log((r_var + eps) / (var + eps))),
    }


def batch_noise(means: np.ndarray, variances: np.ndarray, eps: float) -> tuple[float, float] | None:
    """Sampling noise of one batch, from K >= 2 batches at the same weights (the probe).

    ``means``, ``variances``: [K, U] per-batch m and v. Returns ``(s_m², s_lv²)``: the mean over
    units of Var_b(m_bi)/σ_i² (= 1/n_eff) and of Var_b(log(v_bi + eps)). Units with (almost)
    no variance are left out. ``None`` when K < 2 or no unit varies.
    """
    if means.shape[0] < 2:
        return None
    pooled = variances.mean(0) + means.var(0)
    keep = pooled > eps
    if not keep.any():
        return None
    sm = float(np.mean(means[:, keep].var(0, ddof=1) / pooled[keep]))
    slv = float(np.mean(np.log(variances[:, keep] + eps).var(0, ddof=1)))
    return sm, slv


def noise_floor(noise: float, rho: float) -> float:
    """sqrt(E[lag²]) of a perfect estimate: an EMA of rate ρ (torch's ``momentum``, the weight
    of the new batch; 0 for a fixed or cumulative estimate) of batches with noise variance
    ``noise`` each, compared with a fresh batch: sqrt(noise·(1 + ρ/(2−ρ)))."""
    return math.sqrt(max(noise, 0.0) * (1 + rho / (2 - rho)))


def excess(value: float, floor: float) -> float:
    """The part of a lag that is not sampling noise: sqrt(max(0, lag² − floor²))."""
    return math.sqrt(max(0.0, value * value - floor * floor))


def lag_steps(delta: np.ndarray, velocity: np.ndarray, noise_sd: float) -> tuple[float, float]:
    """Least-squares delay in steps: ``Σ δ_i u_i / Σ u_i²`` and its standard error.

    ``delta`` = (population − estimate)/σ per unit, ``velocity`` u = d(population)/dt/σ per
    step. Positive when the estimate trails a moving population. With δ carrying independent
    noise of std ``noise_sd`` per unit, the standard error is noise_sd/||u||.
    """
    uu = float(np.dot(velocity, velocity))
    if uu <= 0 or not math.isfinite(uu):
        return float("nan"), float("inf")
    return float(np.dot(delta, velocity)) / uu, noise_sd / math.sqrt(uu)


def ema_lag_steps(rho: float, after_update: bool = True) -> float:
    """Steady-state delay of an EMA r ← (1−ρ)r + ρm under constant drift: (1−ρ)/ρ steps when r
    already includes the current batch, 1/ρ steps for the estimate in use when it arrives."""
    return (1 - rho) / rho if after_update else 1 / rho


def dead_fraction(active_sum: np.ndarray) -> float:
    """Fraction of units whose post-ReLU outputs are zero on the whole batch.

    ``active_sum`` is the per-unit sum of the (non-negative) ReLU outputs: it is exactly 0 if
    and only if every output of that unit was 0.
    """
    a = np.asarray(active_sum)
    return float(np.mean(a <= 0)) if a.size else float("nan")


def settle_step(
    steps: Sequence[int],
    means: Sequence[np.ndarray],
    variances: Sequence[np.ndarray],
    epoch_len: int,
    threshold: float,
    threshold_logvar: float,
    eps: float,
) -> int | None:
    """First probe step after which the population statistics move less than the thresholds
    over any window of at most one epoch.

    For probes a < b with 0 < p_b − p_a <= ``epoch_len`` the change is RMS_i (μ*_b − μ*_a)/σ̄_i
    (std units) and RMS_i log(σ*²_b/σ*²_a). The answer is the smallest p_k such that at least
    one such pair starts at or after p_k and none of them exceeds a threshold; ``None`` when
    the statistics never settled within the probes available.
    """
    k = len(steps)
    bad = [False] * k  # bad[a]: some window starting at probe a is over a threshold
    has = [False] * k
    for a in range(k):
        for b in range(a + 1, k):
            gap = steps[b] - steps[a]
            if gap <= 0 or gap > epoch_len:
                continue
            has[a] = True
            sd = np.sqrt((variances[a] + variances[b]) / 2 + eps)
            dm = rms((means[b] - means[a]) / sd)
            dlv = rms(np.log((variances[b] + eps) / (variances[a] + eps)))
            if dm > threshold or dlv > threshold_logvar:
                bad[a] = True
    answer = None
    ok_after = True
    seen = False
    for a in range(k - 1, -1, -1):
        ok_after = ok_after and not bad[a]
        seen = seen or has[a]
        if ok_after and seen:
            answer = steps[a]
        if not ok_after:
            break
    return answer


# ----------------------------------------------------------------------------------------
# The schedule


def log_grid(start: int, per_decade: float, max_gap: int) -> list[int]:
    """Steps ``round(start·10^(k/per_decade))``, k = 0, 1, … until consecutive steps are
    ``max_gap`` or more apart (from there on the regular ``every_n_steps`` takes over)."""
    start = max(int(start), 1)
    out: list[int] = []
    k = 0
    while True:
        t = round(start * 10 ** (k / per_decade))
        k += 1
        if out and t - out[-1] >= max_gap:
            return out
        if not out or t > out[-1]:
            out.append(t)


class Schedule:
    """Which steps are instrumented: every step below ``dense_steps``, then log-spaced steps
    (``per_decade`` per decade) while they are denser than ``every_n_steps``, and every
    ``every_n_steps``-th step throughout. ``t in schedule`` answers for step t."""

    def __init__(self, dense_steps: int, per_decade: float, every_n_steps: int) -> None:
        self.dense_steps, self.per_decade, self.every = dense_steps, per_decade, every_n_steps
        self.grid = frozenset(log_grid(dense_steps, per_decade, every_n_steps))

    def __contains__(self, step: int) -> bool:
        return step < self.dense_steps or step in self.grid or step % self.every == 0

    def count(self, steps: int) -> int:
        """How many of steps 0..steps-1 are instrumented."""
        return sum(1 for t in range(steps) if t in self)


# ----------------------------------------------------------------------------------------
# Host summaries: one step's per-layer numbers -> scalars


@dataclass
class ProbeHistory:
    """The probe's population statistics μ*, σ*² of one layer at each probe step."""

    steps: list[int] = field(default_factory=list)
    means: list[np.ndarray] = field(default_factory=list)
    variances: list[np.ndarray] = field(default_factory=list)

    def velocity(self, eps: float) -> np.ndarray | None:
        """dμ*/dt / σ* per step, from the two latest probes (``None`` with fewer than two)."""
        if len(self.steps) < 2 or self.steps[-1] <= self.steps[-2]:
            return None
        if self.means[-1].shape != self.means[-2].shape:
            return None
        dt = self.steps[-1] - self.steps[-2]
        return (self.means[-1] - self.means[-2]) / dt / np.sqrt(self.variances[-1] + eps)


class HostSummary:
    """Scalars ``<layer>/<stat>`` of instrumented steps, from the collector's per-layer numbers.

    It keeps what a later step needs: each layer's previous logging point (for ``drift_*``),
    the sampling noise of one training batch measured by the last probe (noise floors,
    ``n_eff``) and the probe history (the drift velocity behind ``lag_steps``, and
    ``settle_step``). A lag is computed only where the running estimates hold data
    (``r_ready``): the whitening μ = 0, Var = 1 before their first update are no estimate.
    """

    def __init__(self, eps: float, lag_steps_max_se: float) -> None:
        self.eps, self.lag_steps_max_se = eps, lag_steps_max_se
        self.prev: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        self.noise: dict[str, tuple[float, float]] = {}
        self.probes: dict[str, ProbeHistory] = defaultdict(ProbeHistory)

    def summarise(
        self, step: int, stats: dict[str, dict[str, Any]], probe_scale: float | None
    ) -> dict[str, float]:
        """Every scalar of ``step``; ``probe_scale`` (probe batch / training batch size) when
        the step was probed, else ``None``."""
        out: dict[str, float] = {}
        for name, d in stats.items():
            if probe_scale is not None and "probe_pop" in d:
                out.update(self._probe(step, name, d, probe_scale))
            if d["n"] > 0 and "m" in d:
                out.update(self._layer(step, name, d))
        return out

    def _probe(self, step: int, name: str, d: dict[str, Any], scale: float) -> dict[str, float]:
        eps, key, out = self.eps, f"{name}/", {}
        mu, var = d["probe_pop"]
        means = np.stack([m for m, _ in d["probe"]])
        variances = np.stack([v for _, v in d["probe"]])
        noise = batch_noise(means, variances, eps)
        if noise is not None:  # one *training* batch: noise ∝ 1/batch size
            self.noise[name] = (noise[0] * scale, noise[1] * scale)
            out[key + "n_eff"] = 1.0 / max(self.noise[name][0], 1e-30)
        h = self.probes[name]
        h.steps.append(step)
        h.means.append(mu)
        h.variances.append(var)
        if d.get("rp_ready"):
            for k, v in probe_lag(d["rp_mean"], d["rp_var"], mu, var, eps).items():
                out[key + k] = v
            u = h.velocity(eps)
            if u is not None:
                delta = (mu - d["rp_mean"]) / np.sqrt(var + eps)
                sm = self.noise.get(name, (0.0, 0.0))[0]
                sd = math.sqrt(sm * (d["rho"] / (2 - d["rho"]) + 1.0 / len(d["probe"])))
                ls, se = lag_steps(delta, u, sd)
                if se <= self.lag_steps_max_se:
                    out[key + "lag_steps_probe"] = ls
        return out

    def _layer(self, step: int, name: str, d: dict[str, Any]) -> dict[str, float]:
        eps, key = self.eps, f"{name}/"
        m, v = d["m"], d["v"]
        out = {key + k: val for k, val in input_summary(m, v, eps).items()}
        sm, slv = self.noise.get(name, (1.0 / d["n"], 2.0 / d["n"]))
        prev = self.prev.get(name)
        if prev is not None and prev[1].shape == m.shape and step > prev[0]:
            dm, dlv = drift_rates(m, v, prev[1], prev[2], step - prev[0], eps, sm, slv)
            out[key + "drift_mean"], out[key + "drift_logvar"] = dm, dlv
        self.prev[name] = (step, m, v)
        if d.get("r_ready"):
            out.update(self._lag(name, d, m, v, sm, slv))
        if "active" in d:
            out[key + "dead_frac"] = dead_fraction(d["active"])
        if "grad2" in d:
            out[key + "grad_norm"] = math.sqrt(d["grad2"])
            if d["w2"] > 0:
                out[key + "update_ratio"] = math.sqrt(d["dw2"] / d["w2"])
        return out

    def _lag(
        self, name: str, d: dict[str, Any], m: np.ndarray, v: np.ndarray, sm: float, slv: float
    ) -> dict[str, float]:
        eps, key = self.eps, f"{name}/"
        lg = lag(m, v, d["r_mean"], d["r_var"], eps)
        floor, floor_lv = noise_floor(sm, d["rho"]), noise_floor(slv, d["rho"])
        out = {key + k: val for k, val in lg.items()}
        out[key + "noise_floor"] = floor
        out[key + "noise_floor_logvar"] = floor_lv
        out[key + "lag_mean_z_excess"] = excess(lg["lag_mean_z"], floor)
        out[key + "lag_logvar_excess"] = excess(lg["lag_logvar"], floor_lv)
        u = self.probes[name].velocity(eps) if name in self.probes else None
        if u is not None and u.shape == m.shape:
            delta = (m - d["r_mean"]) / np.sqrt(d["r_var"] + eps)
            ls, se = lag_steps(delta, u, floor)
            if se <= self.lag_steps_max_se:
                out[key + "lag_steps"] = ls
        return out

    def settle_steps(
        self, epoch_len: int, threshold: float, threshold_logvar: float
    ) -> dict[str, int | None]:
        """``settle_step`` of every probed layer (:func:`settle_step`)."""
        return {
            name: settle_step(
                h.steps,
                h.means,
                h.variances,
                max(epoch_len, 1),
                threshold,
                threshold_logvar,
                self.eps,
            )  # fmt: skip
            for name, h in self.probes.items()
        }

    # -- checkpoints: plain tensors and lists (torch.load's weights_only accepts them) -----
    def state_dict(self) -> dict[str, Any]:
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))

        return {
            "prev": {n: (s, t(m), t(v)) for n, (s, m, v) in self.prev.items()},
            "noise": {n: list(v) for n, v in self.noise.items()},
            "probes": {
                n: (list(h.steps), [t(m) for m in h.means], [t(v) for v in h.variances])
                for n, h in self.probes.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev = {n: (int(s), m.numpy(), v.numpy()) for n, (s, m, v) in state["prev"].items()}
        self.noise = {n: (float(a), float(b)) for n, (a, b) in state["noise"].items()}
        self.probes = defaultdict(ProbeHistory)
        for n, (steps, means, variances) in state["probes"].items():
            self.probes[n] = ProbeHistory(
                list(steps), [m.numpy() for m in means], [v.numpy() for v in variances]
            )
