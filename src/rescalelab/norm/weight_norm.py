"""``norm=weightnorm``: weight normalization with mean-only batch normalization
(Salimans & Kingma, 2016).

Every Conv2d and Linear layer (the output layer included) stores its weight as a direction
``v`` and a gain ``g`` per output unit ``j``, through torch's
``torch.nn.utils.parametrizations.weight_norm`` (``dim=0``):

    w_j = g_j · v_j / ‖v_j‖        so that ‖w_j‖ = g_j,

and SG runs on ``(g, v)``. At the start ``g_j = ‖w_j‖`` of the initial weights, so the function
is the initial network's. With ``mean_only_bn: true`` (the paper's combination) each hidden
layer is followed by a mean-only batch normalization, which centres the pre-activation ``t``
with its minibatch mean and adds a learned bias ``b`` (per channel, pooled over positions):

    y = t − μ_B[t] + b            (training; μ_B is differentiated through, as in BN)
    y = t − μ[t]   + b            (eval; μ the running mean, updated with weight ``momentum``)

No variance is divided out: the scale is ``g``'s job. ``mean_only_bn: false`` is plain weight
normalization (the layers keep their own biases).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from rescalelab.errors import FLAG, checked
from rescalelab.geometry import LayerGeometry, rescalable_layers
from rescalelab.norm.plug import MOMENTUM, NormPlug


class MeanOnlyBatchNorm(nn.Module):
    """``y = x − μ_B + b`` per channel (dim 1), pooled over the batch and every other dim."""

    def __init__(self, num_features: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.momentum = num_features, momentum
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            mean = x.mean(dim=[0, *range(2, x.dim())])
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        else:
            mean = self.running_mean.to(x.dtype)
        return x - mean.view(shape) + self.bias.to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}"


@checked("norm", mean_only_bn=FLAG, momentum=MOMENTUM)
class WeightNorm(NormPlug):
    """``norm=weightnorm``: ``w = g·v/‖v‖`` on every Conv2d/Linear, plus mean-only BN.

    ``mean_only_bn`` places :class:`MeanOnlyBatchNorm` after every hidden layer; ``momentum``
    is the weight of the new batch in its running mean (torch BatchNorm's meaning).
    """

    name = "weightnorm"

    def __init__(self, mean_only_bn: bool = True, momentum: float = 0.1) -> None:
        self.mean_only_bn, self.momentum = mean_only_bn, float(momentum)

    def conv(self, channels: int) -> nn.Module:
        return MeanOnlyBatchNorm(channels, self.momentum) if self.mean_only_bn else nn.Identity()

    def linear(self, features: int) -> nn.Module:
        return MeanOnlyBatchNorm(features, self.momentum) if self.mean_only_bn else nn.Identity()

    def prepare(self, model: nn.Module, geometry: dict[str, LayerGeometry]) -> None:
        for _, layer in rescalable_layers(model):
            weight_norm(layer, name="weight", dim=0)
