"""``data=digits``: scikit-learn's 8×8 handwritten digits, a small real dataset that needs no files.

``sklearn.datasets.load_digits`` ships 1797 grey 8×8 images (values 0..16, 10 classes, ~180 per
class) inside the package, so demos and real-data tests run offline. Each image is rescaled to
0..255, upsampled to ``image_size`` × ``image_size`` by bilinear interpolation, rounded to uint8
and replicated to ``channels`` (3 by default, so the CIFAR-shaped models take it unchanged; 1
keeps it grey). The validation split holds ``val_fraction`` of *every* class, chosen from the
seed. Normalization (μ_c, σ_c of the training split) and the optional crop/flip augmentation are
the batched device transforms of :mod:`rescalelab.data.augment`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rescalelab.data.augment import channel_stats
from rescalelab.data.base import ImageDataModule
from rescalelab.errors import ConfigError


def stratified_split(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rest, chosen)`` index tensors; ``chosen`` holds round(fraction · n_c) of every class c."""
    g = torch.Generator().manual_seed(seed)
    chosen, rest = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(fraction * len(idx))
        chosen.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(rest).sort().values, torch.cat(chosen).sort().values


def upsample_digits(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 ``[N, channels, size, size]`` from the 0..16 grey ``[N, 8, 8]`` digits."""
    x = images.float().unsqueeze(1) * (255.0 / 16.0)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, channels, -1, -1).contiguous()


class Digits(ImageDataModule):
    """The 8×8 digits upsampled to ``channels × image_size × image_size``, 10 classes.

    ``num_train``/``num_val`` (``null``: all) keep the first n images of each split in file
    order (the file cycles through the classes, so small n stay balanced).
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        val_fraction: float = 0.2,
        augment: bool = False,
        crop_padding: int = 2,
        flip: bool = False,
        num_train: int | None = None,
        num_val: int | None = None,
        batch_size: int = 128,
        seed: int = 0,
        label_noise: float = 0.0,
        train_eval_size: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size, seed=seed, label_noise=label_noise,
            train_eval_size=train_eval_size,
        )  # fmt: skip
        if not isinstance(image_size, int) or image_size < 8:
            raise ConfigError(f"data.image_size={image_size} is invalid: expected an integer >= 8")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels} is invalid: expected 1 or 3")
        if not 0 < val_fraction < 1:
            raise ConfigError(
                f"data.val_fraction={val_fraction} is invalid: expected a fraction in (0, 1)"
            )
        for key, v in (("data.num_train", num_train), ("data.num_val", num_val)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ConfigError(f"{key}={v} is invalid: expected null or an integer > 0")
        self.input_shape = (channels, image_size, image_size)
        self.val_fraction = val_fraction
        self.augment, self.crop_padding, self.flip = augment, crop_padding, flip
        self.num_train, self.num_val = num_train, num_val
        self.mean: list[float] | None = None
        self.std: list[float] | None = None

    def load(self) -> dict[str, torch.Tensor]:
        from sklearn.datasets import load_digits

        d = load_digits()
        images = torch.from_numpy(d.images)
        labels = torch.from_numpy(d.target).long()
        c, size, _ = self.input_shape
        x = upsample_digits(images, size, c)
        train_idx, val_idx = stratified_split(labels, self.val_fraction, self.seed)
        if self.num_train is not None:
            train_idx = train_idx[: self.num_train]
        if self.num_val is not None:
            val_idx = val_idx[: self.num_val]
        if self.batch_size > len(train_idx):
            raise ConfigError(
                f"data.batch_size={self.batch_size} is invalid: expected <= the "
                f"{len(train_idx)} training images"
            )
        x_train = x[train_idx]
        self.mean, self.std = channel_stats(x_train)
        return {
            "x_train": x_train,
            "y_train": labels[train_idx],
            "x_val": x[val_idx],
            "y_val": labels[val_idx],
        }
