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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rescalelab.data.augment import channel_stats
from rescalelab.data.base import ImageDataModule
from rescalelab.data.checks import COUNT, IMAGE_SIZE
from rescalelab.errors import Expect, checked


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


# stricter than on other datasets: the models take grey or RGB, and both splits need images
@checked(
    "data",
    image_size=IMAGE_SIZE,
    channels=Expect(int, lambda v: v in (1, 3), "1 or 3"),
    val_fraction=Expect(float, lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    num_train=COUNT,
    num_val=COUNT,
)
@dataclass(eq=False, kw_only=True)
class Digits(ImageDataModule):
    """The 8×8 digits upsampled to ``channels × image_size × image_size``, 10 classes.

    ``num_train``/``num_val`` (``null``: all) keep the first n images of each split in file
    order (the file cycles through the classes, so small n stay balanced).
    """

    num_classes = 10

    image_size: int = 32
    channels: int = 3
    val_fraction: float = 0.2
    augment: bool = False
    crop_padding: int = 2
    flip: bool = False  # a mirrored digit is another symbol
    num_train: int | None = None
    num_val: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.input_shape = (self.channels, self.image_size, self.image_size)

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
        x_train = x[train_idx]
        self.mean, self.std = channel_stats(x_train)
        return {
            "x_train": x_train,
            "y_train": labels[train_idx],
            "x_val": x[val_idx],
            "y_val": labels[val_idx],
        }
