"""``optim=sign_sgd``: a torch optimizer shipped by a plugin."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class SignSGD(torch.optim.Optimizer):
    """signSGD: w ← w − α · sign(g + λ w), with α = ``lr`` and λ = ``weight_decay``.

    Every weight moves by exactly ±α per step (0 where the gradient is 0), whatever the scale
    of the gradient: the extreme case of a per-weight rescaling of the stepsize. Works on
    rescalelab's parameter groups, so ``param_groups.layer_scale=fanin`` scales α per layer.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                p.add_(torch.sign(g), alpha=-group["lr"])
        return loss
