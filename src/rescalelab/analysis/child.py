"""The one record of a sweep's child run, shared by the sweep report and the theory report.

A :class:`Child` is what analysis keeps of one job: its identity and status, its params and
tags, the values of the swept keys, and what a report reads of its metrics (the sweep report's
epoch curve of the training loss; the theory report's ``theory/gap`` and ``theory/bound``
histories in :attr:`Child.histories`).

Vocabulary, for the swept keys ``K`` of the sweep (``method``, ``norm``, ``optim.lr``, ``seed``…):
a child's *configuration* is its values of ``K`` minus ``seed``; its *setting* the tuned keys
(``optim.lr``; for an equal budget the space's keys and ``budget_trial``); its *task* the
``data`` option when swept; its *method* the configuration minus setting and task. Its final
value ``F`` is the last point of its curve; it *diverged* when tagged ``rescalelab.status =
diverged`` or ``F`` is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from mlflow.entities import Run

LR_KEY, SEED_KEY, TASK_KEY = "optim.lr", "seed", "data"
STATUS_TAG, DIVERGED = "rescalelab.status", "diverged"
OVERRIDES_TAG = "rescalelab.overrides"


@dataclass
class Child:
    """One job of the sweep, as read back from MLflow."""

    run_id: str
    name: str
    status: str  # the run's MLflow status (FINISHED, FAILED, ...)
    tag_status: str  # its rescalelab.status tag ("diverged" from the divergence guard)
    swept: dict[str, str]
    lr: float | None
    wall_time_s: float | None
    final: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (epoch or step, value)
    stamps: list[float] = field(default_factory=list)  # ms when each curve point was logged
    start_ms: float | None = None
    first_loss: float = math.nan  # the first logged per-step training loss
    diverged_x: float | None = None  # epoch (or step) of the divergence guard's step
    tuning: tuple[str, ...] = (LR_KEY,)  # keys that a tuner chooses: the "setting"
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # step order

    @property
    def seed(self) -> str | None:
        return self.swept.get(SEED_KEY)

    @property
    def batch_size(self) -> int:
        """``n_mb``: the run's ``data.batch_size`` (1 when it has none)."""
        return int(self.params.get("data.batch_size", "1"))

    @property
    def config(self) -> str:
        return label({k: v for k, v in self.swept.items() if k != SEED_KEY})

    @property
    def task(self) -> str:
        """The ``data`` option when the sweep spans several (a task of the profiles), else ``""``."""
        return self.swept.get(TASK_KEY, "")

    @property
    def method(self) -> str:
        skip = (SEED_KEY, TASK_KEY, *self.tuning)
        return label({k: v for k, v in self.swept.items() if k not in skip})

    @property
    def setting(self) -> str:
        """The tuned values (``optim.lr=0.1``; a budget trial's point) without the seed."""
        return label({k: v for k, v in self.swept.items() if k in self.tuning}) or "default"

    @property
    def final_curve_value(self) -> float:
        """``F``: the metric averaged over the last epoch (NaN when nothing was logged)."""
        return self.curve[-1][1] if self.curve else math.nan

    @property
    def diverged_by_tag(self) -> bool:
        return self.tag_status == DIVERGED

    @property
    def diverged(self) -> bool:
        if self.diverged_by_tag:
            return True
        return bool(self.curve) and not math.isfinite(self.final_curve_value)

    @property
    def score(self) -> float:
        """``F`` for ranking: +inf when diverged, NaN when the child has no value at all."""
        return math.inf if self.diverged else self.final_curve_value


def label(values: dict[str, str]) -> str:
    """``k=v k=v`` of ``values`` (``default`` when empty)."""
    return " ".join(f"{k}={v}" for k, v in values.items()) or "default"


def parse_overrides(text: str) -> dict[str, str]:
    """``{key: value}`` of a job's command-line overrides (``+``/``~`` prefixes dropped)."""
    out = {}
    for token in text.split():
        if "=" in token:
            key, value = token.split("=", 1)
            out[key.lstrip("+~")] = value
    return out


def child_record(run: Run, keys: Sequence[str] = (), tuning: Sequence[str] = (LR_KEY,)) -> Child:
    """The :class:`Child` of ``run`` without metrics: identity, status, params, tags and the
    values of the swept ``keys`` (from its overrides, else its params; a tuned key the job did
    not have, such as ``optim.eps`` of SGD in a budget, is left out, any other shows ``?``)."""
    overrides = parse_overrides(run.data.tags.get(OVERRIDES_TAG, ""))
    swept = {}
    for k in keys:
        value = overrides.get(k, run.data.params.get(k))
        if value is not None or k not in tuning:
            swept[k] = value if value is not None else "?"
    lr = run.data.params.get(LR_KEY)
    end, start = run.info.end_time, run.info.start_time
    return Child(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        status=run.info.status,
        tag_status=run.data.tags.get(STATUS_TAG, ""),
        swept=swept,
        lr=float(lr) if lr not in (None, "None") else None,
        wall_time_s=(end - start) / 1000 if end and start else None,
        start_ms=float(start) if start else None,
        tuning=tuple(tuning),
        params=dict(run.data.params),
        tags=dict(run.data.tags),
    )
