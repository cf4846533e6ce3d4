"""A learnable synthetic image-classification set shaped like CIFAR-10.

Each class c has a fixed *prototype* p_c: a smooth random colour field (low-frequency noise
upsampled to the image size). A sample of class c is

    x = s · p_c  +  σ_field · f  +  σ_pix · ε,

with s ~ U(0.6, 1.4) a per-sample contrast, f a fresh smooth field shared by no class, and ε
white pixel noise. Smooth distractors make the task need spatial filters (a linear probe on the
mean colour fails) while a small CNN learns it in a few epochs. Everything is drawn from one
``torch.Generator`` seeded with ``data.seed``, so the set is a pure function of the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rescalelab.data.base import TensorDataModule
from rescalelab.data.checks import COUNT, IMAGE_SIZE, NOISE
from rescalelab.errors import at_least, checked


def _smooth_fields(
    n: int, channels: int, size: int, coarse: int, g: torch.Generator
) -> torch.Tensor:
    z = torch.randn(n, channels, coarse, coarse, generator=g)
    return F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False)


@checked(
    "data",
    num_train=COUNT,
    num_val=COUNT,
    num_classes=at_least(2),
    image_size=IMAGE_SIZE,
    channels=at_least(1),
    field_noise=NOISE,
    pixel_noise=NOISE,
)
@dataclass(eq=False, kw_only=True)
class SyntheticImages(TensorDataModule):
    """CIFAR-shaped (C×H×W, K classes) class-prototype images held as tensors."""

    num_train: int = 5000
    num_val: int = 1000
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    field_noise: float = 2.0  # σ_field
    pixel_noise: float = 1.0  # σ_pix

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_batch(self.num_train, f"data.num_train={self.num_train}")
        self.input_shape = (self.channels, self.image_size, self.image_size)

    def load(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        c, h, _ = self.input_shape
        protos = _smooth_fields(self.num_classes, c, h, 4, g)
        protos = protos / protos.flatten(1).std(dim=1).view(-1, 1, 1, 1)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, self.num_classes, (n,), generator=g)
            contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
            x = contrast * protos[y]
            x = x + self.field_noise * _smooth_fields(n, c, h, 6, g)
            x = x + self.pixel_noise * torch.randn(n, c, h, h, generator=g)
            return x.float(), y

        x_train, y_train = draw(self.num_train)
        x_val, y_val = draw(self.num_val)
        return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}
