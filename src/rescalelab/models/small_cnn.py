"""The two small convolutional networks of the lecture's CIFAR-10 experiments."""

from __future__ import annotations

from torch import Tensor, nn

from rescalelab.norm import NoNorm, NormPlug


def _conv_out(size: int, kernel: int) -> int:
    return size - kernel + 1


class SmallCNN(nn.Module):
    """The lecture's network, exactly as its slide writes it: C6(5x5)-P(2x2)-C16(5x5)-F84-F16-F10.

    ReLU after every hidden layer, a single 2x2 max-pooling, so a 32x32 input gives
    16x10x10 = 1600 inputs to F84. The norm plug's module follows every hidden layer;
    the output layer is never normalized.
    """

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, norm: NormPlug | None = None
    ):
        super().__init__()
        norm = norm or NoNorm()
        c, h, w = input_shape
        oh, ow = _conv_out(_conv_out(h, 5) // 2, 5), _conv_out(_conv_out(w, 5) // 2, 5)
        if oh < 1 or ow < 1:
            raise ValueError(f"SmallCNN needs inputs of at least 14x14, got {h}x{w}")
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5), norm.conv(6), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), norm.conv(16), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * oh * ow, 84), norm.linear(84), nn.ReLU(),
            nn.Linear(84, 16), norm.linear(16), nn.ReLU(),
            nn.Linear(16, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class LeNet(nn.Module):
    """The Torch tutorial network the slide cites: C6-P-C16-P-F120-F84-F10 (5x5 convs, 2x2 pools)."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, norm: NormPlug | None = None
    ):
        super().__init__()
        norm = norm or NoNorm()
        c, h, w = input_shape
        oh, ow = _conv_out(_conv_out(h, 5) // 2, 5) // 2, _conv_out(_conv_out(w, 5) // 2, 5) // 2
        if oh < 1 or ow < 1:
            raise ValueError(f"LeNet needs inputs of at least 16x16, got {h}x{w}")
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5), norm.conv(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), norm.conv(16), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * oh * ow, 120), norm.linear(120), nn.ReLU(),
            nn.Linear(120, 84), norm.linear(84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
