"""The convex problems served as DataModules (``data=quadratic``, ``data=logistic``).

A :class:`ConvexDataModule` draws its problem from ``problem_seed`` (inputs whose second moment
has the spectrum logspace(0, −log10 cond), labels from w_true), holds the samples as tensors and
serves minibatches ξ_k: with ``replacement`` drawn i.i.d. with replacement, as BCN §4 assume
(:class:`SampledBatches`), else a permutation per epoch; ``batch_size = num_train`` is full-batch
gradient descent. :meth:`ConvexDataModule.objective` is F on the minibatch, regularizer included,
and :meth:`ConvexDataModule.constants` the problem's L, c, μ, M, M_V, M_G for that minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rescalelab.data.base import TensorDataModule
from rescalelab.data.checks import COUNT, FOLDER_PATH, NOISE, SEED
from rescalelab.data.convex.problems import (
    DTYPE,
    ConvexProblem,
    LeastSquaresProblem,
    LogisticProblem,
    Tensor,
    draw_inputs,
    population,
)
from rescalelab.data.tensor_batches import TensorBatches
from rescalelab.errors import FLAG, Expect, above, at_least, checked, number_at_least


class SampledBatches(TensorBatches):
    """Minibatches of indices drawn *with replacement*: the ξ_k are i.i.d., as BCN assume.

    One "epoch" is ⌊n/n_mb⌋ such minibatches; draws come from ``seed`` and the epoch number, so
    they are reproducible and resumable like :class:`TensorBatches`.
    """

    def _order(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.x)
        return torch.randint(0, n, (n,), generator=g).to(self.x.device)


@checked(
    "data",
    dim=at_least(1),
    num_train=COUNT,
    num_val=COUNT,
    cond=Expect(float, lambda v: v >= 1, "a number >= 1"),
    lam=number_at_least(0),
    replacement=FLAG,
    problem_seed=SEED,
    noise_estimate=FLAG,
    # the targets are real numbers (or ±1), not class labels to redraw
    label_noise=Expect(
        float, lambda v: v == 0, "0 (the targets of a convex problem are not class labels)"
    ),
)
@dataclass(eq=False, kw_only=True)
class ConvexDataModule(TensorDataModule):
    """A :class:`ConvexProblem` served as (x, y) minibatches, with its exact objective.

    ``problem_seed`` draws the problem; ``seed`` only draws the samples, so runs that differ in
    ``seed`` are independent SG runs on the *same* problem. ``replacement=true`` samples
    minibatches i.i.d. with replacement; ``batch_size = num_train`` is full-batch gradient descent.
    The model has one real output (``num_classes = 1``).
    """

    num_classes = 1
    problem_class: ClassVar[type[ConvexProblem]] = ConvexProblem

    dim: int = 20
    num_train: int = 4000
    num_val: int = 1000
    cond: float = 20.0
    lam: float = 1e-3
    batch_size: int = 1
    replacement: bool = True
    problem_seed: int = 0
    noise_estimate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_batch(self.num_train, f"data.num_train={self.num_train}")
        self.cond, self.lam = float(self.cond), float(self.lam)
        self.replacement = bool(self.replacement)
        self.input_shape = (self.dim,)
        self.problem: ConvexProblem | None = None
        self._noise: dict[str, float] = {}

    # -- to implement -------------------------------------------------------------------------
    def labels(self, x: Tensor, w_true: Tensor, g: torch.Generator) -> Tensor:
        """Labels of inputs ``x`` under the true weights."""
        raise NotImplementedError

    def true_weights(self, g: torch.Generator) -> Tensor:
        return torch.randn(self.dim, generator=g, dtype=DTYPE)

    def make_problem(self, x: Tensor, y: Tensor) -> ConvexProblem:
        return self.problem_class(x, y, self.lam)

    # -- TensorDataModule --------------------------------------------------------------------
    def load(self) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.problem_seed)
        q, s = population(self.dim, self.cond, g)
        w_true = self.true_weights(g)
        x = draw_inputs(self.num_train, q, s, g, exact=self.num_train >= self.dim)
        y = self.labels(x, w_true, g)
        x_val = draw_inputs(self.num_val, q, s, g, exact=False)
        y_val = self.labels(x_val, w_true, g)
        self.problem = self.make_problem(x, y)
        if self.noise_estimate:
            self._noise = self.problem.estimate_noise(seed=self.problem_seed)
        return {
            "x_train": x.float(), "y_train": y.float(), "x_val": x_val.float(), "y_val": y_val.float(),
        }  # fmt: skip

    def describe(self) -> dict[str, Any]:
        assert self.problem is not None
        return {**super().describe(), **self.problem.describe(), **self._noise}

    def train_batches_class(self) -> type[TensorBatches]:
        """i.i.d. minibatches drawn with replacement (``replacement``, unless full-batch)."""
        if self.replacement and self.batch_size < self.num_train:
            return SampledBatches
        return TensorBatches

    # -- the exact objective on a minibatch -----------------------------------------------------
    def objective(self, outputs: Tensor, y: Tensor, model: nn.Module) -> Tensor:
        """(1/n_mb) Σ ℓ(z_i, y_i) + (λ/2)‖w‖²: F on the minibatch, regularizer included, so its
        gradient is the stochastic gradient g(w, ξ) of the theory (no optimizer weight decay)."""
        assert self.problem is not None
        z = outputs.reshape(-1)
        reg = sum((p * p).sum() for p in model.parameters())
        return self.problem.loss(z, y).mean() + 0.5 * self.lam * reg

    def constants(self) -> dict[str, float]:
        """The problem's constants for this DataModule's minibatch size and sampling."""
        assert self.problem is not None
        return self.problem.constants(self.batch_size, self.replacement)


@checked("data", noise_std=NOISE)
@dataclass(eq=False, kw_only=True)
class QuadraticData(ConvexDataModule):
    """``data=quadratic``: ridge least squares, y = xᵀw_true + σ ε (``noise_std`` = σ)."""

    problem_class = LeastSquaresProblem

    # Not ``label_noise``: on the image datasets that is the share of redrawn labels.
    noise_std: float = 0.5

    def labels(self, x: Tensor, w_true: Tensor, g: torch.Generator) -> Tensor:
        eps = torch.randn(len(x), generator=g, dtype=DTYPE)
        return x @ w_true + self.noise_std * eps


# λ > 0 here (ridge regression takes λ = 0): the logistic loss alone has no minimizer when the
# classes separate
@checked("data", lam=above(0), weight_scale=above(0), cache_dir=FOLDER_PATH)
@dataclass(eq=False, kw_only=True)
class LogisticData(ConvexDataModule):
    """``data=logistic``: y ∈ {−1, +1} with P(y = 1 | x) = sigmoid(xᵀw_true),
    w_true ~ ``weight_scale`` · N(0, I). F* is cached under ``cache_dir``."""

    problem_class = LogisticProblem

    lam: float = 1e-2
    weight_scale: float = 2.0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.weight_scale = float(self.weight_scale)

    def true_weights(self, g: torch.Generator) -> Tensor:
        return self.weight_scale * torch.randn(self.dim, generator=g, dtype=DTYPE)

    def labels(self, x: Tensor, w_true: Tensor, g: torch.Generator) -> Tensor:
        u = torch.rand(len(x), generator=g, dtype=DTYPE)
        return torch.where(u < torch.sigmoid(x @ w_true), 1.0, -1.0).to(DTYPE)

    def make_problem(self, x: Tensor, y: Tensor) -> ConvexProblem:
        key = {
            "dim": self.dim, "num_train": self.num_train, "cond": self.cond, "lam": self.lam,
            "weight_scale": self.weight_scale, "problem_seed": self.problem_seed,
        }  # fmt: skip
        return LogisticProblem(x, y, self.lam, cache_dir=self.cache_dir, key=key)
