"""``model=tiny_mlp``: the smallest network that still has a hidden layer for the norm plug."""

from __future__ import annotations

import math

from torch import Tensor, nn

from rescalelab.norm import NoNorm, NormPlug


class TinyMLP(nn.Module):
    """x ↦ W₂ · relu(plug(W₁ · flatten(x) + b₁)) + b₂ with ``hidden`` hidden units.

    Takes what every rescalelab model takes (``input_shape``, ``num_classes`` from the data and
    the norm plug), so ``norm=bn`` or ``param_groups.layer_scale=fanin`` work on it unchanged.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        norm: NormPlug | None = None,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        norm = norm or NoNorm()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            norm.linear(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
