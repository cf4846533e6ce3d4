"""``norm=layernorm`` and ``norm=groupnorm``: normalizations that do not depend on the batch.

For a conv output ``y`` of shape ``(C, H, W)`` (one example), GroupNorm (Wu & He, 2018) splits
the ``C`` channels into ``G`` groups ``S_g`` and normalizes each group over its channels and
positions, then applies a per-channel affine map:

    μ_g = mean_{c∈S_g, h, w} y_chw,   σ_g² = var_{c∈S_g, h, w} y_chw,
    ŷ_chw = γ_c (y_chw − μ_g)/sqrt(σ_g² + ε) + β_c.

LayerNorm (Ba, Kiros & Hinton, 2016) is the case ``G = 1`` (all channels and positions of one
example); after a Linear layer both are ``nn.LayerNorm`` over the features (GroupNorm falls back
to LayerNorm there). The statistics are those of the example itself, so training and eval
compute the same function and nothing depends on the batch size.

``norm.groups`` is ``G``; a layer whose channel count ``C`` is not a multiple of it uses the
largest divisor of ``C`` not above ``G`` (6 channels with ``G = 8`` → 6 groups, 16 → 8).
"""

from __future__ import annotations

from torch import nn

from rescalelab.errors import at_least, checked
from rescalelab.norm.plug import EPS, NormPlug


def groups_for(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups``."""
    return max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)


@checked("norm", eps=EPS)
class LayerNorm(NormPlug):
    """``norm=layernorm``: ``GroupNorm(1, C)`` after a conv, ``LayerNorm(F)`` after a Linear."""

    name = "layernorm"

    def __init__(self, eps: float = 1e-5) -> None:
        self.eps = eps

    def conv(self, channels: int) -> nn.Module:
        return nn.GroupNorm(1, channels, eps=self.eps)

    def linear(self, features: int) -> nn.Module:
        return nn.LayerNorm(features, eps=self.eps)


@checked("norm", groups=at_least(1), eps=EPS)
class GroupNorm(NormPlug):
    """``norm=groupnorm``: ``GroupNorm(G, C)`` after a conv, ``LayerNorm(F)`` after a Linear."""

    name = "groupnorm"

    def __init__(self, groups: int = 8, eps: float = 1e-5) -> None:
        self.groups, self.eps = groups, eps

    def conv(self, channels: int) -> nn.Module:
        return nn.GroupNorm(groups_for(channels, self.groups), channels, eps=self.eps)

    def linear(self, features: int) -> nn.Module:
        return nn.LayerNorm(features, eps=self.eps)
