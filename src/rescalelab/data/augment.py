"""Whole-batch image transforms on the training device: crop, flip, per-channel normalization.

Images are stored as uint8 ``[N, C, S, S]`` (what the dataset files hold, 1 byte per value) and
converted batch by batch. For a batch ``x`` (values in 0..255) the transform computes

    x̃ = (x / 255 − μ_c) / σ_c,

with μ_c, σ_c the per-channel mean and standard deviation of the training split (in [0, 1]
units). Before that, in training:

* **random crop with padding** — pad by r pixels (zeros, as torchvision's ``RandomCrop``), then
  cut a ``size × size`` window at an offset (o_y, o_x) drawn uniformly in {0, …, S + 2r − size};
* **horizontal flip** — each image is mirrored with probability 1/2.

The offsets and flip bits of the whole batch are drawn at once from the generator that
:class:`~rescalelab.data.tensor_batches.TensorBatches` hands in (seeded from the seed and the
epoch), and applied as two ``gather`` calls and one ``where`` over the batch: no Python loop
over images, no host–device synchronization. Evaluation uses a centre crop and no flip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean μ_c and standard deviation σ_c of uint8 images ``[N, C, H, W]``, in [0, 1]."""
    n, c = x.shape[:2]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for i in range(0, n, chunk):
        xb = x[i : i + chunk].to(torch.float64) / 255.0
        total += xb.sum(dim=(0, 2, 3))
        total_sq += (xb * xb).sum(dim=(0, 2, 3))
    count = n * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def crop_batch(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, size: int) -> torch.Tensor:
    """``out[n] = x[n, :, oy[n] : oy[n] + size, ox[n] : ox[n] + size]`` for the whole batch."""
    n, c, _, w = x.shape
    ar = torch.arange(size, device=x.device)
    rows = (oy.view(n, 1) + ar).view(n, 1, size, 1).expand(n, c, size, w)
    x = x.gather(2, rows)
    cols = (ox.view(n, 1) + ar).view(n, 1, 1, size).expand(n, c, size, size)
    return x.gather(3, cols)


def flip_batch(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror (along the width) the images whose ``flip`` entry is true."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


class ImageBatchTransform:
    """``transform(xb, generator)``: optional pad + crop (random or centre), flip, normalize.

    ``size`` is the output side (``None``: keep the stored size). ``padding`` r pads each side
    before cropping. With ``random_crop`` the window is drawn per image, otherwise centred.
    ``mean``/``std`` are per-channel μ_c, σ_c in [0, 1] units; ``None`` skips normalization
    (the output is then x/255).
    """

    def __init__(
        self,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        *,
        size: int | None = None,
        padding: int = 0,
        random_crop: bool = False,
        flip: bool = False,
    ) -> None:
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)
        self.size, self.padding = size, padding
        self.random_crop, self.flip = random_crop, flip
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _scale_shift(
        self, device: torch.device, channels: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x̃ = x · a + b with a = 1 / (255 σ_c), b = −μ_c / σ_c (one fused multiply-add per value)
        if device not in self._affine:
            if self.mean is None or self.std is None:
                a = torch.full((channels,), 1 / 255.0)
                b = torch.zeros(channels)
            else:
                a, b = 1.0 / (255.0 * self.std), -self.mean / self.std
            self._affine[device] = (a.view(1, -1, 1, 1).to(device), b.view(1, -1, 1, 1).to(device))
        return self._affine[device]

    def __call__(self, xb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n = len(xb)
        if self.padding:
            xb = F.pad(xb, (self.padding,) * 4)
        h, w = xb.shape[-2:]
        if self.size is not None and (h, w) != (self.size, self.size):
            if h < self.size or w < self.size:
                raise ValueError(f"cannot crop {self.size}x{self.size} from {h}x{w} images")
            if self.random_crop:
                oy = torch.randint(0, h - self.size + 1, (n,), generator=generator)
                ox = torch.randint(0, w - self.size + 1, (n,), generator=generator)
                xb = crop_batch(xb, oy.to(xb.device), ox.to(xb.device), self.size)
            else:
                top, left = (h - self.size) // 2, (w - self.size) // 2
                xb = xb[:, :, top : top + self.size, left : left + self.size]
        if self.flip:
            flip = torch.rand(n, generator=generator) < 0.5
            xb = flip_batch(xb, flip.to(xb.device))
        a, b = self._scale_shift(xb.device, xb.shape[1])
        x = xb.float() if xb.dtype == torch.uint8 else xb.float() * 255.0
        return torch.addcmul(b, x, a)
