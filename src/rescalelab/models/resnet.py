"""``model=resnet20``: the CIFAR ResNet-20 of He, Zhang, Ren & Sun (2016, section 4.2).

A 3×3 conv with 16 channels, then 3 stages of ``n = 3`` basic blocks with 16, 32 and 64
channels (the first block of stages 2 and 3 halves the map with stride 2), global average
pooling and a Linear classifier: 6n + 2 = 20 weight layers. A basic block computes

    y = relu( N₂(conv₂( relu(N₁(conv₁(x))) )) + s(x) )

with ``N`` the norm plug's module, placed after every conv as in the paper, and ``s`` the
shortcut: the identity when the shape is kept; where it changes, ``shortcut: projection``
(option B) is a strided 1×1 conv followed by the plug's module, ``shortcut: pad`` (option A,
the paper's CIFAR choice) subsamples and pads the new channels with zeros. With BatchNorm the
network has 272,474 parameters (projection) or 269,722 (pad): "0.27 M".

A conv followed by a module that is not ``nn.Identity`` (BN, GN, LN, mean-only BN, batch renorm)
has no bias, which that module's own shift makes redundant; a conv followed by nothing
(``none``, ``whitening``, weight norm without mean-only BN) keeps its bias, which whitening
needs for its centering. BN folding (``norm=bn_warmup``) gives the folded convs their bias.
Weights use He initialization (normal, fan-out) as in the paper.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rescalelab.errors import at_least, checked, one_of
from rescalelab.norm import NoNorm, NormPlug

SHORTCUTS = ("projection", "pad")


def conv_norm(
    norm: NormPlug, cin: int, cout: int, kernel: int, stride: int = 1
) -> tuple[nn.Conv2d, nn.Module]:
    """A ``kernel``×``kernel`` conv (same padding) and the plug's module that follows it."""
    after = norm.conv(cout)
    conv = nn.Conv2d(
        cin, cout, kernel, stride, padding=kernel // 2, bias=isinstance(after, nn.Identity)
    )
    return conv, after


class PadShortcut(nn.Module):
    """Option A: ``x[:, :, ::s, ::s]`` with ``extra`` zero channels appended (no parameters)."""

    def __init__(self, extra: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = extra, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """Two 3×3 convs, each followed by the plug's module, plus the shortcut."""

    def __init__(
        self, cin: int, cout: int, stride: int, norm: NormPlug, shortcut: str = "projection"
    ) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv_norm(norm, cin, cout, 3, stride)
        self.conv2, self.norm2 = conv_norm(norm, cout, cout, 3)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if shortcut == "projection":
                self.shortcut = nn.Sequential(*conv_norm(norm, cin, cout, 1, stride))
            else:
                self.shortcut = PadShortcut(cout - cin, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # not in place: folding matches tensors by id


@checked("model", blocks=at_least(1), width=at_least(1), shortcut=one_of(*SHORTCUTS))
class ResNet20(nn.Module):
    """ResNet-20 for ``input_shape = (C, H, W)`` and ``num_classes`` (both from the data).

    ``blocks`` is n (3 for ResNet-20, 5 for ResNet-32, ...); ``shortcut`` is ``projection``
    (option B) or ``pad`` (option A); ``width`` the channels of the first stage (16).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        norm: NormPlug | None = None,
        blocks: int = 3,
        width: int = 16,
        shortcut: str = "projection",
    ) -> None:
        super().__init__()
        norm = norm or NoNorm()
        c, h, w = input_shape
        if min(h, w) < 4:
            raise ValueError(f"ResNet20 needs inputs of at least 4x4, got {h}x{w}")
        self.conv, self.norm = conv_norm(norm, c, width, 3)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            layers = []
            for b in range(blocks):
                stride = 2 if i > 0 and b == 0 else 1
                layers.append(BasicBlock(cin, cout, stride, norm, shortcut))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.conv(x)))
        x = self.stages(x)
        return self.fc(x.mean(dim=(2, 3)))
