"""The batched device transforms: crop with padding, flip and normalization, checked image by image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rescalelab.data.augment import ImageBatchTransform, channel_stats, crop_batch


def _images(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_crop_batch_cuts_each_window_at_its_own_offset():
    x = _images(20, 16)
    oy, ox = torch.randint(0, 5, (20,)), torch.randint(0, 5, (20,))
    out = crop_batch(x, oy, ox, 12)
    for i in range(20):
        a, b = int(oy[i]), int(ox[i])
        assert torch.equal(out[i], x[i, :, a : a + 12, b : b + 12])


def test_random_crop_with_padding_and_flip_match_one_shift_of_each_image():
    r, n = 2, 400
    x = _images(n)
    padded = F.pad(x, (r,) * 4)
    tf = ImageBatchTransform(None, None, size=12, padding=r, random_crop=True, flip=True)
    out = tf(x, torch.Generator().manual_seed(5))
    raw = (out * 255).round().to(torch.uint8)  # no normalization: out = x / 255
    shifts, flips = [], []
    for i in range(n):
        windows = {
            (dy, dx): padded[i, :, dy : dy + 12, dx : dx + 12]
            for dy in range(2 * r + 1)
            for dx in range(2 * r + 1)
        }
        found = [
            (dy, dx, f)
            for (dy, dx), w in windows.items()
            for f in (False, True)
            if torch.equal(raw[i], w.flip(2) if f else w)
        ]
        assert found, f"image {i} is no shifted/flipped window of its input"
        shifts.append(found[0][:2])
        flips.append(found[0][2])
    # every offset in {0..2r}^2 occurs, and about half of the images are flipped
    assert {s for s in shifts} == {(a, b) for a in range(2 * r + 1) for b in range(2 * r + 1)}
    assert 0.4 < np.mean(flips) < 0.6


def test_same_generator_seed_same_batch_other_seed_differs():
    x = _images(64)
    tf = ImageBatchTransform(None, None, size=12, padding=4, random_crop=True, flip=True)
    a = tf(x, torch.Generator().manual_seed(1))
    b = tf(x, torch.Generator().manual_seed(1))
    c = tf(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normalization_is_x_over_255_minus_mu_over_sigma():
    x = _images(8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    out = ImageBatchTransform(mean, std)(x)
    expected = (x.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1).double()) / torch.tensor(
        std
    ).view(1, 3, 1, 1).double()
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_eval_centre_crop():
    x = _images(4, 20)
    out = ImageBatchTransform(None, None, size=14)(x)
    assert torch.allclose(out, x[:, :, 3:17, 3:17].float() / 255)
    with pytest.raises(ValueError, match="cannot crop 24x24 from 20x20"):
        ImageBatchTransform(None, None, size=24)(x)


def test_channel_stats_are_the_per_channel_mean_and_std():
    x = _images(50, 8)
    mean, std = channel_stats(x, chunk=7)
    arr = x.numpy().astype(np.float64) / 255
    assert np.allclose(mean, arr.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(std, arr.std(axis=(0, 2, 3)), atol=1e-6)
