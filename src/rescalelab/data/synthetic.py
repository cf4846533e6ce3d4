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

import torch
import torch.nn.functional as F

from rescalelab.data.base import TensorDataModule, check_positive
from rescalelab.errors import ConfigError


def _smooth_fields(
    n: int, channels: int, size: int, coarse: int, g: torch.Generator
) -> torch.Tensor:
    z = torch.randn(n, channels, coarse, coarse, generator=g)
    return F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False)


class SyntheticImages(TensorDataModule):
    """CIFAR-shaped (C×H×W, K classes) class-prototype images held as tensors."""

    def __init__(
        self,
        num_train: int = 5000,
        num_val: int = 1000,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 3,
        field_noise: float = 2.0,
        pixel_noise: float = 1.0,
        batch_size: int = 128,
        seed: int = 0,
        label_noise: float = 0.0,
        train_eval_size: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size, seed=seed, label_noise=label_noise,
            train_eval_size=train_eval_size,
        )  # fmt: skip
        for key, value in [("data.num_train", num_train), ("data.num_val", num_val)]:
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}={value} is invalid: expected an integer > 0")
        if num_classes < 2:
            raise ConfigError(f"data.num_classes={num_classes} is invalid: expected >= 2")
        check_positive("data.image_size", image_size)
        if batch_size > num_train:
            raise ConfigError(
                f"data.batch_size={batch_size} is invalid: expected <= data.num_train={num_train}"
            )
        self.num_train, self.num_val = num_train, num_val
        self.num_classes = num_classes
        self.input_shape = (channels, image_size, image_size)
        self.field_noise, self.pixel_noise = field_noise, pixel_noise

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
