"""Stepsize schedules as multipliers of each parameter group's base stepsize.

Every schedule here is a ``LambdaLR`` whose factor multiplies the group's initial lr, so the
per-layer scales of ``optim.layer_scale`` survive any schedule. ``k`` counts optimizer steps
from 0 (or epochs with ``interval: epoch``).
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


class _Constant:
    def __call__(self, k: int) -> float:
        return 1.0


def constant(optimizer: torch.optim.Optimizer) -> LambdaLR:
    """α_k = α: the fixed stepsize of Theorem 4.6."""
    return LambdaLR(optimizer, _Constant())
