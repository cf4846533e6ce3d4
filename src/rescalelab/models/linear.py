"""The linear model of the convex problems: one Linear layer on the flattened input."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rescalelab.errors import FLAG, checked, one_of
from rescalelab.norm import NoNorm, NormPlug


@checked("model", bias=FLAG, init=one_of("zeros", "default"))
class LinearModel(nn.Module):
    """z = xᵀw (+ b): ``Linear(prod(input_shape), num_classes)`` on the flattened input.

    With the convex problems (``data=quadratic``/``logistic``, ``num_classes = 1``) the
    parameter vector is exactly the w of F(w), so keep ``bias: false`` there (the problems'
    constants are for F(w) without a bias). ``init``: ``zeros`` starts SG at w_1 = 0,
    ``default`` uses torch's uniform(±1/√fanin) initialization. There is no hidden layer, so
    the norm plug has nothing to normalize.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        norm: NormPlug | None = None,
        bias: bool = False,
        init: str = "zeros",
    ) -> None:
        super().__init__()
        self.norm = norm or NoNorm()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(math.prod(input_shape), num_classes, bias=bias)
        if init == "zeros":
            with torch.no_grad():
                for p in self.linear.parameters():
                    p.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.flatten(x))
