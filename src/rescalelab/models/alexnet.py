"""``model=alexnet``: torchvision's AlexNet layout with the norm plug after every hidden layer.

The layers are those of ``torchvision.models.alexnet`` (the one-GPU variant of Krizhevsky et
al. 2012 used in the lecture's ImageNet experiments)::

    C64(11x11, stride 4, pad 2) - P(3x3, s2) - C192(5x5, pad 2) - P(3x3, s2)
    - C384(3x3) - C256(3x3) - C256(3x3) - P(3x3, s2) - AdaptiveAvgPool(6x6)
    - Dropout - F4096 - Dropout - F4096 - F<num_classes>

with ReLU after every hidden layer. The norm plug's module sits between each hidden Conv2d or
Linear and its ReLU (``norm.conv(c)``, ``norm.linear(f)``); the output layer is never
normalized. At 224×224 this is torchvision's network exactly (the conv maps are 55, 27, 13 and
6 after the last pool). Small inputs run too: the adaptive pooling makes the classifier's input
always 256·6·6 = 9216, and a max-pooling whose 3×3 window is larger than its input passes the
input through (a 32×32 input gives maps of 7, 3, 1, 1; 64×64 gives 15, 7, 3, 1).
"""

from __future__ import annotations

from torch import Tensor, nn

from rescalelab.errors import Expect, at_least, checked
from rescalelab.norm import NoNorm, NormPlug


class MaxPool(nn.MaxPool2d):
    """``MaxPool2d(3, 2)`` that passes inputs smaller than its window through unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size if isinstance(self.kernel_size, int) else min(self.kernel_size)
        if min(x.shape[-2:]) < k:
            return x
        return super().forward(x)


@checked(
    "model",
    dropout=Expect(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    pool_size=at_least(1),
)
class AlexNet(nn.Module):
    """AlexNet for ``input_shape = (C, H, W)`` and ``num_classes`` outputs (both from the data).

    ``dropout`` is the drop probability of the two dropout layers (0.5 in torchvision);
    ``pool_size`` the side of the adaptive average pooling (6 in torchvision).
    """

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, norm: NormPlug | None = None,
        dropout: float = 0.5, pool_size: int = 6,
    ) -> None:  # fmt: skip
        super().__init__()
        norm = norm or NoNorm()
        c, h, w = input_shape
        if min(h, w) < 7:
            raise ValueError(f"AlexNet needs inputs of at least 7x7, got {h}x{w}")

        def conv(cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride, pad), norm.conv(cout), nn.ReLU(inplace=True)]

        def linear(fin: int, fout: int) -> list[nn.Module]:
            return [nn.Dropout(dropout), nn.Linear(fin, fout), norm.linear(fout), nn.ReLU(True)]

        self.features = nn.Sequential(
            *conv(c, 64, 11, stride=4, pad=2), MaxPool(3, 2),
            *conv(64, 192, 5, pad=2), MaxPool(3, 2),
            *conv(192, 384, 3, pad=1),
            *conv(384, 256, 3, pad=1),
            *conv(256, 256, 3, pad=1), MaxPool(3, 2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            *linear(256 * pool_size * pool_size, 4096),
            *linear(4096, 4096),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))
