"""SG theory next to the experiment: the exact optimality gap and the bounds BCN §4 predict.

For the convex problems (``data=quadratic``/``logistic`` with ``model=linear``) F, F*, L, c, μ, M
and M_G are known (see :mod:`rescalelab.data.convex`; M and M_V are divided by n_mb for
minibatches). :class:`TheoryCallback` logs, every ``every_n_steps`` optimizer steps k (k = 0 is
the initial point, BCN's w_1):

* ``theory/gap`` = F(w_k) − F* on the full training objective, ``theory/grad_norm2`` = ‖∇F(w_k)‖²;
* ``theory/bound``: the bound on E[F(w_k) − F*] for the current schedule
  - ``constant`` — Theorem 4.6: ᾱLM/(2cμ) + (1 − ᾱcμ)^k (F(w_1) − F* − ᾱLM/(2cμ));
  - ``inverse`` (α_k = β/(γ+k)) — Theorem 4.7: ν/(γ + k + 1),
    ν = max{β²LM/(2(βcμ − 1)), (γ+1)(F(w_1) − F*)}; only when βcμ > 1;
  - any other schedule — the recursion the two theorems are proved from (Lemma 4.4 with 4.12),
    b_{k+1} = (1 − α_k cμ) b_k + ½ α_k² L M, b_0 = F(w_1) − F*, on the stepsizes actually used;
* ``theory/grad_norm2_avg``, the average of ‖∇F‖² over the iterates k = 0, N, 2N, … (a uniform
  subsample of the average over all iterates, N = ``every_n_steps``), and with a
  constant stepsize ``theory/grad_bound`` — Theorem 4.8 (4.28b):
  ᾱLM/μ + 2(F(w_1) − F_inf)/(Kμᾱ) with F_inf = F*, K = k + 1 iterates.

The theorems assume α ≤ μ/(L M_G) (4.13, 4.20); that condition, checked on the first (largest)
stepsize, is logged as the param ``theory.condition_ok`` and the tag ``rescalelab.theory.condition``
(``ok``/``violated``). The bounds are logged either way: they often hold well beyond it.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch

from rescalelab.errors import ConfigError, at_least, checked, required
from rescalelab.optim.schedules import ConstantFactor, InverseFactor

CONDITION_TAG = "rescalelab.theory.condition"


# -- the bounds, as plain functions of the constants -------------------------------------------
def fixed_step_bound(
    k: int, alpha: float, L: float, c: float, M: float, gap1: float, mu: float = 1.0
) -> float:
    """Theorem 4.6 after k steps: F_α + (1 − αcμ)^k (F(w_1) − F* − F_α), F_α = αLM/(2cμ)."""
    f_alpha = alpha * L * M / (2 * c * mu)
    return f_alpha + (1 - alpha * c * mu) ** k * (gap1 - f_alpha)


def inverse_nu(
    beta: float, gamma: float, L: float, c: float, M: float, gap1: float, mu: float = 1.0
) -> float | None:
    """ν of Theorem 4.7 (4.22): max{β²LM/(2(βcμ − 1)), (γ+1)(F(w_1) − F*)}; None if βcμ ≤ 1."""
    if beta * c * mu <= 1:
        return None
    return max(beta**2 * L * M / (2 * (beta * c * mu - 1)), (gamma + 1) * gap1)


def inverse_bound(
    k: int, beta: float, gamma: float, L: float, c: float, M: float, gap1: float, mu: float = 1.0
) -> float | None:
    """Theorem 4.7 after k steps: ν/(γ + k + 1) (BCN's iterate w_{k+1}); None if βcμ ≤ 1."""
    nu = inverse_nu(beta, gamma, L, c, M, gap1, mu)
    return None if nu is None else nu / (gamma + k + 1)


def nonconvex_average_bound(
    K: int, alpha: float, L: float, M: float, gap1: float, mu: float = 1.0
) -> float:
    """Theorem 4.8 (4.28b): E[(1/K) Σ_{k=1..K} ‖∇F(w_k)‖²] ≤ ᾱLM/μ + 2(F(w_1) − F_inf)/(Kμᾱ)."""
    return alpha * L * M / mu + 2 * gap1 / (K * mu * alpha)


def recursion_step(
    bound: float, alpha: float, L: float, c: float, M: float, mu: float = 1.0
) -> float:
    """One step of Lemma 4.4 + (4.12): b ← (1 − αcμ) b + ½α²LM (valid for α ≤ μ/(L M_G))."""
    return (1 - alpha * c * mu) * bound + 0.5 * alpha**2 * L * M


def schedule_kind(trainer: pl.Trainer) -> tuple[str, Any]:
    """(``constant`` | ``inverse`` | ``other``, the schedule's factor) of the first scheduler."""
    configs = trainer.lr_scheduler_configs
    if not configs:
        return "constant", ConstantFactor()
    config = configs[0]
    factor = (getattr(config.scheduler, "lr_lambdas", None) or [None])[0]
    if isinstance(factor, ConstantFactor):  # constant, however often it is stepped
        return "constant", factor
    per_step = config.interval == "step" and config.frequency == 1
    if per_step and isinstance(factor, InverseFactor):
        return "inverse", factor
    return "other", factor


# -- the callback ------------------------------------------------------------------------------
@checked("callbacks.theory", every_n_steps=required(at_least(1)), per_decade=at_least(0))
class TheoryCallback(pl.Callback):
    """Log the exact gap, ‖∇F‖² and BCN's bounds every ``every_n_steps`` steps (see module doc).

    ``per_decade`` > 0 adds that many log-spaced steps per decade (1, 2, 5, 10, … for 3), so
    that log-log plots of long runs have points at small k too.
    """

    def __init__(self, every_n_steps: int = 50, per_decade: int = 0) -> None:
        self.every_n_steps, self.per_decade = every_n_steps, per_decade or 0  # null: off, as 0
        self._log_steps: set[int] = set()

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _weights(pl_module: pl.LightningModule, d: int) -> torch.Tensor:
        w = torch.cat([p.detach().reshape(-1) for p in pl_module.model.parameters()])
        if w.numel() != d:
            raise ConfigError(
                f"callbacks=theory is invalid with this model: it has {w.numel()} parameters, "
                f"the problem has d={d} (expected model=linear model.bias=false)"
            )
        return w.to("cpu", torch.float64)

    @staticmethod
    def _lr(trainer: pl.Trainer) -> float:
        return float(trainer.optimizers[0].param_groups[0]["lr"])

    def _wanted(self, step: int) -> bool:
        return step % self.every_n_steps == 0 or step in self._log_steps

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        self.problem = getattr(datamodule, "problem", None)
        if self.problem is None:
            raise ConfigError(
                "callbacks=theory is invalid with this data: expected data=quadratic or data=logistic"
            )
        self.const = datamodule.constants()
        self.kind, self.factor = schedule_kind(trainer)
        self.alpha1 = self._lr(trainer)
        c, L, M, mu = self.const["c"], self.const["L"], self.const["M"], self.const["mu"]
        w = self._weights(pl_module, self.problem.d)
        self.gap1 = float(self.problem.gap(w))
        self.recursion = self.gap1
        self.grad_sum, self.grad_count = 0.0, 0
        if self.per_decade > 0:
            top = max(int(trainer.estimated_stepping_batches), 1) if math.isfinite(
                trainer.estimated_stepping_batches) else 10**7  # fmt: skip
            n = int(math.log10(top) * self.per_decade) + 1
            self._log_steps = {round(10 ** (j / self.per_decade)) for j in range(n + 1)}
        ok = self.alpha1 <= self.const["alpha_max"]
        params: dict[str, Any] = {
            "theory.schedule": self.kind,
            "theory.theorem": {"constant": "4.6", "inverse": "4.7"}.get(self.kind, "4.4-recursion"),
            "theory.L": L, "theory.c": c, "theory.mu": mu, "theory.M": M,
            "theory.M_G": self.const["M_G"], "theory.alpha_max": self.const["alpha_max"],
            "theory.alpha_1": self.alpha1, "theory.gap_1": self.gap1, "theory.condition_ok": ok,
        }  # fmt: skip
        if self.kind == "inverse":
            beta = self.alpha1 * (self.factor.gamma + 1)
            params.update({"theory.beta": beta, "theory.gamma": self.factor.gamma,
                           "theory.beta_c": beta * c * mu})  # fmt: skip
            ok = ok and beta * c * mu > 1
            params["theory.condition_ok"] = ok
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams(params)
                client, run_id = (
                    getattr(logger, "experiment", None),
                    getattr(logger, "run_id", None),
                )
                if run_id is not None and hasattr(client, "set_tag"):
                    client.set_tag(run_id, CONDITION_TAG, "ok" if ok else "violated")
        self._evaluate(trainer, pl_module, 0)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._alpha = self._lr(trainer)  # the stepsize this step uses (schedules step after it)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        c, L, M, mu = self.const["c"], self.const["L"], self.const["M"], self.const["mu"]
        self.recursion = recursion_step(self.recursion, self._alpha, L, c, M, mu)
        step = trainer.global_step
        if self._wanted(step):
            self._evaluate(trainer, pl_module, step)

    # -- the measurement ----------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, k: int) -> None:
        c, L, M, mu = self.const["c"], self.const["L"], self.const["M"], self.const["mu"]
        w = self._weights(pl_module, self.problem.d)
        gap = float(self.problem.gap(w))
        grad2 = float((self.problem.gradient(w) ** 2).sum())
        if k % self.every_n_steps == 0 and math.isfinite(grad2):  # a uniform subsample of k
            self.grad_sum, self.grad_count = self.grad_sum + grad2, self.grad_count + 1
        metrics = {"theory/gap": gap, "theory/grad_norm2": grad2}
        if self.grad_count:
            metrics["theory/grad_norm2_avg"] = self.grad_sum / self.grad_count
        if self.kind == "constant":
            metrics["theory/bound"] = fixed_step_bound(k, self.alpha1, L, c, M, self.gap1, mu)
            metrics["theory/grad_bound"] = nonconvex_average_bound(
                k + 1, self.alpha1, L, M, self.gap1, mu
            )
        elif self.kind == "inverse":
            beta = self.alpha1 * (self.factor.gamma + 1)
            bound = inverse_bound(k, beta, self.factor.gamma, L, c, M, self.gap1, mu)
            if bound is not None:
                metrics["theory/bound"] = bound
        else:
            metrics["theory/bound"] = self.recursion
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=k)
