"""Many seeds of SG at once on the convex problems: BCN's expectations measured, CPU-cheap.

The theorems bound ``E[F(w_k)] − F*``: one run shows a noisy sample of it. :func:`run_sg` runs
``R`` independent SG runs as the rows of one ``[R, d]`` matrix (``w ← w − α_k g(w, ξ_k)``, the
``ξ_k`` i.i.d. minibatches drawn with replacement, independently per row), on the framework's own
problem objects (``rescalelab.data.convex``): thousands of steps × dozens of seeds in seconds,
where a Lightning fit per seed would take minutes.

:class:`VectorizedSG` is the ``runner`` of a job (``experiment=theory_diminishing``): instead of a
Lightning fit, ``rescalelab-train`` runs :func:`run_sg` with ``runs`` rows on the job's data,
model initialisation (``w_1``), ``optim.lr`` and schedule (its factor ``α_k = optim.lr ×
factor(k)``), for ``trainer.max_epochs`` epochs of ``num_train/batch_size`` steps (or
``trainer.max_steps``), and logs into the job's MLflow run, at the steps ``callbacks=theory``
uses (k = 0, every ``every_n_steps``, ``per_decade`` log-spaced steps per decade):

* ``theory/gap`` = the mean over the ``R`` runs of ``F(w_k) − F*`` (the estimate of
  ``E[F(w_k)] − F*``) and ``theory/gap_se``, its standard error;
* ``theory/bound``: Theorem 4.6 (constant α) or 4.7 (``α_k = β/(γ + k + 1)``, when βcμ > 1);
* ``train/lr`` = ``α_k``;
* params ``theory.runs``, ``theory.schedule``, ``theory.beta``, ``theory.gamma``,
  ``theory.beta_c``, ``theory.condition_ok`` (as ``callbacks=theory`` logs them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR

from rescalelab.callbacks.theory import fixed_step_bound, inverse_bound
from rescalelab.errors import ConfigError
from rescalelab.optim import build_optimizer, build_scheduler
from rescalelab.optim.schedules import ConstantFactor, InverseFactor

Alpha = float | torch.Tensor | Callable[[int], "float | torch.Tensor"]


def run_sg(
    problem: Any,
    alpha: Alpha,
    steps: int,
    runs: int,
    *,
    batch_size: int = 1,
    w0: torch.Tensor | None = None,
    seed: int = 0,
    record: Callable[[int], bool] = lambda k: False,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``runs`` independent SG runs ``w ← w − α_k g(w, ξ_k)`` from ``w0`` (default ``w*``), the
    ``ξ_k`` i.i.d. minibatches of ``batch_size`` samples (with replacement); ``alpha`` is a
    number, a ``[runs, 1]`` tensor or ``k ↦ α_k`` (k = 0 the first step). Returns the final
    iterates ``[runs, d]`` and ``{k: gap of every run}`` for the recorded k (k steps done)."""
    g = torch.Generator().manual_seed(seed)
    start = problem.w_star if w0 is None else w0
    w = start.to(torch.float64).expand(runs, -1).clone()
    gaps: dict[int, torch.Tensor] = {}
    k = 0
    while k < steps:
        chunk = min(4096, steps - k)
        idx = torch.randint(0, problem.n, (chunk, runs, batch_size), generator=g)
        for j in range(chunk):
            a = alpha(k) if callable(alpha) else alpha
            w -= a * problem.minibatch_gradient(w, idx[j])
            k += 1
            if record(k):
                gaps[k] = problem.gap(w)
    return w, gaps


def log_steps(total: int, every_n_steps: int, per_decade: int) -> list[int]:
    """k = 0, every ``every_n_steps``-th step and ``per_decade`` log-spaced steps per decade."""
    steps = set(range(0, total + 1, every_n_steps))
    if per_decade > 0 and total > 0:
        n = int(math.log10(total) * per_decade) + 1
        steps |= {round(10 ** (j / per_decade)) for j in range(n + 1)}
    return sorted(s for s in steps if s <= total)


class VectorizedSG:
    """``runner``: ``runs`` seeds of SG in one ``[runs, d]`` matrix instead of a Lightning fit.

    Args:
        runs: independent SG runs (their mean estimates the expectation the theorems bound).
        every_n_steps: log every n-th step (and k = 0).
        per_decade: that many log-spaced steps per decade too (for log-log slopes).
    """

    def __init__(self, runs: int = 64, every_n_steps: int = 200, per_decade: int = 10) -> None:
        for key, value, low in (("runs", runs, 1), ("every_n_steps", every_n_steps, 1),
                                ("per_decade", per_decade, 0)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(
                    f"runner.{key}={value!r} is invalid: expected an integer >= {low}"
                )
        self.runs, self.every_n_steps, self.per_decade = runs, every_n_steps, per_decade

    def plan(self, cfg: DictConfig, parts: dict[str, Any]) -> dict[str, Any]:
        """Check the job and derive what the runs need (before anything is tracked)."""
        dm = parts["datamodule"]
        problem = getattr(dm, "problem", None)
        if problem is None:
            raise ConfigError("runner is invalid with this data: expected data=quadratic|logistic")
        optim = cfg.optim
        if (
            not str(optim.get("_target_", "")).endswith("SGD")
            or optim.get("momentum", 0)
            or (optim.get("weight_decay", 0))
        ):
            raise ConfigError(
                "runner is invalid with this optim: expected optim=sgd with momentum=0 and "
                "weight_decay=0 (plain SG; the problem holds its own regularizer)"
            )
        model = parts["module"].model
        w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(torch.float64)
        if w.numel() != problem.d:
            raise ConfigError(
                f"runner is invalid with this model: it has {w.numel()} parameters, the problem "
                f"has d={problem.d} (expected model=linear model.bias=false)"
            )
        per_epoch = max(1, dm.num_train // dm.batch_size)
        max_steps = int(cfg.trainer.get("max_steps", -1) or -1)
        total = max_steps if max_steps > 0 else per_epoch * int(cfg.trainer.max_epochs)
        module = parts["module"]
        optimizer = build_optimizer(
            module.make_optimizer, module.make_groups, model, module.geometry
        )
        sched = build_scheduler(
            module.make_scheduler, optimizer, module.lr_scheduler_config,
            total_steps=total, total_epochs=int(cfg.trainer.max_epochs),
        )  # fmt: skip
        scheduler = sched["scheduler"] if isinstance(sched, dict) else sched
        if not isinstance(scheduler, LambdaLR):
            raise ConfigError(
                "runner is invalid with this schedule: expected a factor schedule "
                "(constant, inverse, halving mode=every, cosine)"
            )
        factor = scheduler.lr_lambdas[0]
        per_step = not isinstance(sched, dict) or sched.get("interval", "step") == "step"
        return {"problem": problem, "w0": w, "total": total, "per_epoch": per_epoch,
                "lr": float(optim.lr), "factor": factor, "per_step": per_step,
                "batch_size": dm.batch_size, "constants": dm.constants(), "seed": int(cfg.seed)}  # fmt: skip

    def run(self, cfg: DictConfig, parts: dict[str, Any], logger: Any) -> dict[int, float]:
        """Run the seeds and log (module docstring); return ``{k: mean gap}``."""
        p = self.plan(cfg, parts)
        lr, factor, per_epoch = p["lr"], p["factor"], p["per_epoch"]

        def alpha(k: int) -> float:
            return lr * factor(k if p["per_step"] else k // per_epoch)

        const = p["constants"]
        c, L, M, mu = const["c"], const["L"], const["M"], const["mu"]
        gap1 = float(p["problem"].gap(p["w0"].unsqueeze(0))[0])
        kind = "constant" if isinstance(factor, ConstantFactor) else (
            "inverse" if isinstance(factor, InverseFactor) and p["per_step"] else "other")  # fmt: skip
        params: dict[str, Any] = {"theory.runs": self.runs, "theory.schedule": kind,
                                  "theory.alpha_1": lr, "theory.gap_1": gap1,
                                  "theory.condition_ok": lr <= const["alpha_max"]}  # fmt: skip
        beta = gamma = None
        if kind == "inverse":
            gamma = float(factor.gamma)
            beta = lr * (gamma + 1)
            params.update({"theory.beta": beta, "theory.gamma": gamma,
                           "theory.beta_c": beta * c * mu,
                           "theory.condition_ok": params["theory.condition_ok"] and beta * c * mu > 1})  # fmt: skip
        logger.log_hyperparams(params)
        wanted = set(log_steps(p["total"], self.every_n_steps, self.per_decade))
        _, gaps = run_sg(
            p["problem"], alpha, p["total"], self.runs, batch_size=p["batch_size"], w0=p["w0"],
            seed=p["seed"], record=lambda k: k in wanted,
        )  # fmt: skip
        if 0 in wanted:  # w_1, the same for every run
            gaps[0] = p["problem"].gap(p["w0"].expand(self.runs, -1))
        means: dict[int, float] = {}
        for k in sorted(gaps):
            gap = gaps[k]
            mean = float(gap.mean())
            means[k] = mean
            metrics = {"theory/gap": mean, "train/lr": alpha(k)}
            if self.runs > 1:
                metrics["theory/gap_se"] = float(gap.std()) / math.sqrt(self.runs)
            if kind == "constant":
                metrics["theory/bound"] = fixed_step_bound(k, lr, L, c, M, gap1, mu)
            elif kind == "inverse":
                bound = inverse_bound(k, beta, gamma, L, c, M, gap1, mu)
                if bound is not None:
                    metrics["theory/bound"] = bound
            logger.log_metrics(metrics, step=k)
        return means
