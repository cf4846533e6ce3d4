"""How the benchmark measures: variants interleaved in alternating order, medians of per-round
ratios with their quartiles, and a Lightning callback that clocks a fit's training batches."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch


@dataclass
class Comparison:
    """Median seconds per unit for each variant and the median ratio of each variant to the base."""

    row: str
    unit: str
    base: str
    medians: dict[str, float]
    ratios: dict[str, tuple[float, float, float]]  # variant -> (q25, median, q75) of variant/base
    target: str = ""
    holds: bool | None = None
    notes: list[str] = field(default_factory=list)


def interleave(
    fns: dict[str, Callable[[], float]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Call every variant once per round, alternating the order; return each variant's samples."""
    for _ in range(warmup):
        for name, fn in fns.items():
            progress(f"warm-up {name}")
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            progress(f"round {r + 1}/{rounds} {name}")
            samples[name].append(fns[name]())
    return samples


_T0 = time.monotonic()


def progress(what: str) -> None:
    """One status line on stderr, rewritten in place (``\\r``), with the time elapsed."""
    line = f"bench {time.monotonic() - _T0:5.0f} s: {what}"[:100]
    sys.stderr.write(f"\r{line:<100}")
    sys.stderr.flush()


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q25, median, q75) of ``values`` (all three the value itself for a single one)."""
    if len(values) < 2:
        return (values[0],) * 3
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def ratio_quartiles(over: list[float], under: list[float]) -> tuple[float, float, float]:
    """Quartiles of the per-round ratios ``over[r] / under[r]``."""
    return quartiles([a / b for a, b in zip(over, under)])


def compare(
    row: str, samples: dict[str, list[float]], base: str, unit: str = "s/step"
) -> Comparison:
    """Each variant's median and the quartiles of its per-round ratio to ``base``."""
    medians = {k: statistics.median(v) for k, v in samples.items()}
    ratios = {k: ratio_quartiles(v, samples[base]) for k, v in samples.items() if k != base}
    return Comparison(row, unit, base, medians, ratios)


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class FitClock(pl.Callback):
    """Lightning callback measuring the wall time of training (``on_train_start`` to
    ``on_train_end``: every step and epoch end; no validation runs in the benchmark's fits)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(str(pl_module.device))
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(str(pl_module.device))
        self.seconds = time.perf_counter() - self.t0
        self.steps = trainer.global_step

    def per_step(self) -> float:
        """Seconds per training step of the fit just clocked."""
        return self.seconds / max(self.steps, 1)
