"""Strongly convex synthetic problems with known constants (BCN §4, paper-notes §8).

:mod:`~rescalelab.data.convex.problems` holds the mathematics (F, ∇F, the stochastic gradients
and the constants L, c, μ, M, M_V, M_G, F*); :mod:`~rescalelab.data.convex.datamodules` serves a
problem's samples as minibatches for training (``data=quadratic``, ``data=logistic``).
"""

from rescalelab.data.convex.datamodules import (
    ConvexDataModule,
    LogisticData,
    QuadraticData,
    SampledBatches,
)
from rescalelab.data.convex.problems import ConvexProblem, LeastSquaresProblem, LogisticProblem

__all__ = [
    "ConvexDataModule",
    "ConvexProblem",
    "LeastSquaresProblem",
    "LogisticData",
    "LogisticProblem",
    "QuadraticData",
    "SampledBatches",
]
