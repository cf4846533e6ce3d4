"""The two small convolutional networks of the lecture's CIFAR-10 experiments."""

from __future__ import annotations

from torch import Tensor, nn

from rescalelab.norm import NoNorm, NormPlug


def _conv_out(size: int, kernel: int) -> int:
    return size - kernel + 1


class _TwoConvNet(nn.Module):
    """C6(5x5)-P(2x2)-C16(5x5)[-P(2x2)]-F<h1>-F<h2>-F<classes>, ReLU after every hidden layer.

    The norm plug's module follows every hidden layer; the output layer is never normalized.
    """

    hidden: tuple[int, int]  # h1, h2
    pool_twice: bool  # a second 2x2 max-pooling after C16
    min_side: int  # the smallest input side that leaves one position after the last conv/pool

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, norm: NormPlug | None = None
    ) -> None:
        super().__init__()
        norm = norm or NoNorm()
        c, h, w = input_shape
        last = 2 if self.pool_twice else 1  # the side divisor of the pooling after C16
        oh, ow = (_conv_out(_conv_out(s, 5) // 2, 5) // last for s in (h, w))
        if oh < 1 or ow < 1:
            raise ValueError(
                f"{type(self).__name__} needs inputs of at least {self.min_side}x{self.min_side}, "
                f"got {h}x{w}"
            )
        last_pool = [nn.MaxPool2d(2)] if self.pool_twice else []
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5), norm.conv(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), norm.conv(16), nn.ReLU(), *last_pool,
        )  # fmt: skip
        h1, h2 = self.hidden
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * oh * ow, h1), norm.linear(h1), nn.ReLU(),
            nn.Linear(h1, h2), norm.linear(h2), nn.ReLU(),
            nn.Linear(h2, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class SmallCNN(_TwoConvNet):
    """The lecture's network, exactly as its slide writes it: C6(5x5)-P(2x2)-C16(5x5)-F84-F16-F10.

    ReLU after every hidden layer, a single 2x2 max-pooling, so a 32x32 input gives
    16x10x10 = 1600 inputs to F84.
    """

    hidden, pool_twice, min_side = (84, 16), False, 14


class LeNet(_TwoConvNet):
    """The Torch tutorial network the slide cites: C6-P-C16-P-F120-F84-F10 (5x5 convs, 2x2 pools)."""

    hidden, pool_twice, min_side = (120, 84), True, 16
