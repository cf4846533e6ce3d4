"""Stepsize schedules as multipliers of each parameter group's base stepsize.

Every schedule here multiplies each group's *initial* lr by the same factor, so the per-layer
scales of ``param_groups.layer_scale`` survive any schedule: group ``l`` uses
``α_k · (share_l × fanin_l)^(-1/2)``. ``k`` counts scheduler steps from 0 (optimizer steps, or
epochs with ``lr_scheduler_config.interval=epoch``); ``α_0 = optim.lr`` is the first stepsize.

* ``constant``  α_k = α                                          (Theorem 4.6)
* ``halving``   α_k = α · 2^(-⌊k/T⌋), or ÷2 whenever the smoothed training loss stops decreasing
* ``inverse``   α_k = β/(γ + k + 1), β = α(γ + 1)                 (Theorem 4.7, BCN's k = ours + 1)
* ``cosine``    α_k = α · (m + (1 − m) · ½(1 + cos(π k/P)))       (P = the whole run by default)
* ``warmup_cosine``  α_k = α (s + (1 − s) k/W) for k < W, then
                α_k = α (f + (1 − f) · ½(1 + cos(π (k − W)/(P − W))))  (torch's LinearLR,
                CosineAnnealingLR and SequentialLR; W = warmup_epochs × steps per epoch)
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    ReduceLROnPlateau,
    SequentialLR,
)

from rescalelab.errors import ConfigError, Expect, checked

HALVING_MODES = ("every", "plateau")
STEPS = Expect(int, lambda v: v >= 1, "an integer >= 1")
FACTOR = Expect(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


class ConstantFactor:
    """Factor 1: α_k = α."""

    def __call__(self, k: int) -> float:
        return 1.0


class HalvingFactor:
    """Factor 2^(-⌊k/T⌋): the stepsize is divided by 2 every ``every`` = T steps."""

    def __init__(self, every: int) -> None:
        self.every = every

    def __call__(self, k: int) -> float:
        return 0.5 ** (k // self.every)


class InverseFactor:
    """Factor (γ+1)/(γ+1+k), so that α_k = β/(γ + k + 1) with β = α_0 (γ + 1).

    In BCN's numbering (first step k = 1) this is Theorem 4.7's α_k = β/(γ + k).
    """

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def __call__(self, k: int) -> float:
        return (self.gamma + 1.0) / (self.gamma + 1.0 + k)


class CosineFactor:
    """Factor m + (1 − m)·½(1 + cos(π min(k, P)/P)): from 1 down to ``min_factor`` = m at k = P."""

    def __init__(self, period: int, min_factor: float = 0.0) -> None:
        self.period, self.min_factor = period, min_factor

    def __call__(self, k: int) -> float:
        t = min(k, self.period) / self.period
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


class SmoothedPlateau(ReduceLROnPlateau):
    """Divide every group's stepsize by 2 when the *smoothed* training loss stops decreasing.

    The training loss ℓ_k of each step arrives through :meth:`observe` (the LightningModule
    calls ``rescalelab.optim.observe_loss``). It is noisy under SG, so the decision uses its
    exponential moving average ℓ̄_k = (1 − ρ) ℓ̄_{k−1} + ρ ℓ_k (``smoothing`` = ρ): when ℓ̄ has
    not gone below its best value by a relative ``threshold`` for ``patience`` steps, α ← α/2
    for every group (so the per-layer ratios stay). Non-finite losses leave ℓ̄ unchanged.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        smoothing: float = 0.01,
        patience: int = 1000,
        threshold: float = 1e-3,
        min_lr: float = 0.0,
    ) -> None:
        super().__init__(
            optimizer, mode="min", factor=0.5, patience=patience, threshold=threshold,
            threshold_mode="rel", min_lr=min_lr,
        )  # fmt: skip
        self.smoothing = smoothing
        for group in optimizer.param_groups:  # as LRScheduler does: the ratio α/α_0 is readable
            group.setdefault("initial_lr", group["lr"])
        self.smoothed: float | None = None
        self._pending: list[torch.Tensor | float] = []

    def observe(self, loss: torch.Tensor | float) -> None:
        """Record the training loss of the step about to be taken."""
        self._pending.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)

    def step(self, metrics: float | None = None, epoch: int | None = None) -> None:  # type: ignore[override]
        """Fold the observed losses (or ``metrics``) into ℓ̄, then let ReduceLROnPlateau decide."""
        values = [float(v) for v in self._pending] if metrics is None else [float(metrics)]
        self._pending = []
        for value in values:
            if math.isfinite(value):
                rho = self.smoothing
                prev = self.smoothed
                self.smoothed = value if prev is None else (1 - rho) * prev + rho * value
        if self.smoothed is None:
            self.last_epoch += 1
            return
        super().step(self.smoothed)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("_pending", None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._pending = []


def constant(optimizer: torch.optim.Optimizer) -> LambdaLR:
    """α_k = α: the fixed stepsize of Theorem 4.6."""
    return LambdaLR(optimizer, ConstantFactor())


@checked(
    "schedule",
    mode=Expect(str, lambda v: v in HALVING_MODES, "one of: every, plateau"),
    every=STEPS,
    smoothing=Expect(float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    patience=Expect(int, lambda v: v >= 0, "an integer >= 0"),
    threshold=Expect(float, lambda v: v >= 0, "a number >= 0"),
)
def halving(
    optimizer: torch.optim.Optimizer,
    mode: str = "every",
    every: int = 1000,
    smoothing: float = 0.01,
    patience: int = 1000,
    threshold: float = 1e-3,
) -> LambdaLR | SmoothedPlateau:
    """α ÷ 2 every ``every`` steps (``mode=every``), or on a plateau of the smoothed training
    loss (``mode=plateau``, see :class:`SmoothedPlateau`): BCN's halving strategy (4.17–4.18)."""
    if mode == "every":
        return LambdaLR(optimizer, HalvingFactor(every))
    return SmoothedPlateau(optimizer, smoothing=smoothing, patience=patience, threshold=threshold)


@checked("schedule", gamma=Expect(float, lambda v: v >= 0, "a number >= 0"))
def inverse(optimizer: torch.optim.Optimizer, gamma: float = 391.0) -> LambdaLR:
    """α_k = β/(γ + k + 1) with β = α_0(γ + 1): Theorem 4.7's diminishing stepsize.

    ``optim.lr`` is α_0, the first stepsize; pick γ = β/α_0 − 1 for a target β (BCN recommend
    β = 2/(cμ) and α_0 = μ/(L M_G)). The 1/k rate needs β c μ > 1 (2βc > 1 on quadratics).
    """
    return LambdaLR(optimizer, InverseFactor(float(gamma)))


@checked("schedule", period=STEPS, min_factor=FACTOR)
def cosine(
    optimizer: torch.optim.Optimizer, period: int | None = None, min_factor: float = 0.0
) -> LambdaLR:
    """α_k = α (m + (1 − m)·½(1 + cos(πk/P))), constant at α·m after P steps.

    ``period`` = P defaults to the length of the run (filled in by ``build_scheduler``); a run
    of unknown length (``trainer.max_epochs=-1``) gets P = 1, the constant α·m from step 1.
    """
    if period is None:
        period = 1
    return LambdaLR(optimizer, CosineFactor(period, float(min_factor)))


class WarmupCosine(SequentialLR):
    """``SequentialLR(LinearLR, CosineAnnealingLR)`` that can continue on rebuilt param groups.

    ``norm=bn_warmup`` rebuilds the optimizer at its switch (the BatchNorm parameters are gone)
    and hands it the old scheduler's state; the wrapped schedulers' per-group ``base_lrs`` of
    that state are then of the old groups. They are kept from this scheduler's own groups
    when the counts differ (the stepsizes themselves continue from the groups' ``lr``).
    """

    def load_state_dict(self, state_dict: dict) -> None:
        own = [list(s.base_lrs) for s in self._schedulers]
        super().load_state_dict(state_dict)
        n = len(self.optimizer.param_groups)
        for scheduler, base in zip(self._schedulers, own):
            if len(scheduler.base_lrs) != n:
                scheduler.base_lrs = base


@checked(
    "schedule",
    warmup_epochs=Expect(float, lambda v: v >= 0, "a number >= 0"),
    final_factor=FACTOR,
    start_factor=Expect(float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    period=STEPS,
    steps_per_epoch=Expect(int, lambda v: v >= 1, "an integer >= 1 or null"),
)
def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_epochs: float = 5.0,
    final_factor: float = 0.0,
    start_factor: float = 0.01,
    period: int | None = None,
    steps_per_epoch: int | None = None,
) -> LRScheduler:
    """Linear warm-up from α·s to α over W steps, then cosine from α to α·f at step P.

    ``W = round(warmup_epochs × steps_per_epoch)`` (the schedule's steps per epoch: batches
    per epoch with ``interval=step``, 1 with ``interval=epoch``) and ``P = period`` (the
    whole run); both are filled in by ``build_scheduler`` when null. Built from torch's
    schedulers: ``LinearLR(s, 1, W)`` then ``CosineAnnealingLR(P − W, η_min = f·α)``, joined
    by ``SequentialLR`` at milestone W. torch's ``η_min`` is one number for all groups, so
    ``final_factor > 0`` needs one base stepsize in every group
    (``param_groups.layer_scale=none``); with ``final_factor = 0`` every group's stepsize is
    its own base times the same factor.
    """
    dry = period is None or steps_per_epoch is None  # a run of unknown length: no warm-up
    period = 2 if period is None else int(period)
    warmup = 0 if dry else round(warmup_epochs * steps_per_epoch)
    if not dry and warmup >= period:
        raise ConfigError(
            f"schedule.warmup_epochs={warmup_epochs!r} is invalid: the warm-up ({warmup} "
            f"steps) leaves no cosine steps in a run of {period}: expected fewer warm-up epochs"
        )
    bases = {g["lr"] for g in optimizer.param_groups}
    if final_factor > 0 and len(bases) > 1:
        raise ConfigError(
            f"schedule.final_factor={final_factor!r} is invalid with per-group stepsizes "
            "(param_groups.layer_scale=fanin): expected 0, since torch's CosineAnnealingLR has one "
            "eta_min for all groups"
        )
    eta_min = final_factor * next(iter(bases))
    cosine = CosineAnnealingLR(optimizer, T_max=period - warmup, eta_min=eta_min)
    if warmup == 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup)
    return WarmupCosine(optimizer, [linear, cosine], milestones=[warmup])
