"""Tiny datasets written in exactly the real on-disk formats, for tests and benchmarks
(``tests/fixtures_data.py`` and the data rows of ``rescalelab-bench``).

* :func:`write_cifar10` — ``cifar-10-batches-py/`` with the keys, dtypes and shapes of the real
  pickles (``b'data'`` uint8 ``[n, 3072]``, ``b'labels'`` list of int, ``b'filenames'``,
  ``b'batch_label'``; ``batches.meta`` with ``b'label_names'``), protocol 2 like the originals.
* :func:`write_imagefolder` — ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``: real JPEG files
  saved with PIL from crops of scikit-learn's two sample photographs.

Images of class c are crops around a fixed, class-specific location of the photos (with random
jitter, size and aspect), so the tiny sets are learnable. Everything is drawn from ``seed``.
"""

from __future__ import annotations

import pickle
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

LABEL_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


@cache
def sample_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's sample photos (china.jpg, flower.jpg), uint8 427x640x3."""
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(im, dtype=np.uint8) for im in load_sample_images().images)


def _anchor(label: int, num_classes: int) -> tuple[int, float, float]:
    """Photo index and relative (y, x) centre of the region class ``label`` is cut from."""
    photo = label % 2
    k = label // 2
    per_photo = (num_classes + 1) // 2
    return photo, 0.3 + 0.4 * ((k * 7) % 5) / 4, 0.1 + 0.8 * k / max(per_photo - 1, 1)


def photo_crop(
    label: int, num_classes: int, h: int, w: int, rng: np.random.Generator
) -> np.ndarray:
    """An ``h × w`` RGB crop (uint8, HWC) near the anchor of ``label``, with random jitter."""
    photos = sample_photos()
    photo, cy, cx = _anchor(label, num_classes)
    img = photos[photo]
    H, W = img.shape[:2]
    y0 = int(np.clip(cy * H - h / 2 + rng.integers(-12, 13), 0, H - h))
    x0 = int(np.clip(cx * W - w / 2 + rng.integers(-12, 13), 0, W - w))
    return img[y0 : y0 + h, x0 : x0 + w]


def cifar_images(labels: np.ndarray, rng: np.random.Generator, num_classes: int = 10) -> np.ndarray:
    """uint8 ``[n, 3072]`` rows (R, G, B planes of 32×32), one 64×64 crop downscaled per label."""
    rows = np.empty((len(labels), 3072), dtype=np.uint8)
    for i, y in enumerate(labels):
        crop = photo_crop(int(y), num_classes, 64, 64, rng)
        small = np.asarray(Image.fromarray(crop).resize((32, 32), Image.Resampling.BILINEAR))
        rows[i] = small.transpose(2, 0, 1).reshape(-1)
    return rows


def write_cifar10(
    root: Path, per_batch: int = 100, test: int = 100, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write ``root/cifar-10-batches-py/`` (5 train batches of ``per_batch``, a test batch).

    Returns the pixels and labels in file order: ``x_train`` uint8 ``[5·per_batch, 3, 32, 32]``,
    ``y_train``, ``x_val``, ``y_val``.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        n = test if name == "test_batch" else per_batch
        labels = rng.integers(0, 10, n)
        data = cifar_images(labels, rng)
        desc = "testing batch 1 of 1" if name == "test_batch" else f"training batch {b + 1} of 5"
        obj = {
            b"batch_label": desc.encode(),
            b"labels": [int(v) for v in labels],
            b"data": data,
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(n)],
        }
        with (folder / name).open("wb") as f:
            pickle.dump(obj, f, protocol=2)
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [n.encode() for n in LABEL_NAMES],
        b"num_vis": 3072,
    }
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return {
        "x_train": np.concatenate(xs[:5]),
        "y_train": np.concatenate(ys[:5]),
        "x_val": xs[5],
        "y_val": ys[5],
    }


def wnid(c: int) -> str:
    return f"n{1440764 + 1000 * c:08d}"


def write_imagefolder(
    root: Path,
    num_classes: int = 3,
    train_counts: list[int] | None = None,
    val_count: int = 3,
    seed: int = 0,
    min_side: int = 40,
    max_side: int = 96,
) -> dict[str, dict[str, list[str]]]:
    """Write ``root/{train,val}/<wnid>/<wnid>_<i>.JPEG``: real JPEGs of varied size and aspect
    (one in five greyscale, to exercise the RGB conversion).

    ``train_counts[c]`` images in train/ for class c (default 6 + 2c, so classes differ), and
    ``val_count`` in val/. Returns ``{split: {wnid: [relative paths]}}``.
    """
    rng = np.random.default_rng(seed)
    counts = train_counts or [6 + 2 * c for c in range(num_classes)]
    out: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}}
    for split in ("train", "val"):
        for c in range(num_classes):
            folder = root / split / wnid(c)
            folder.mkdir(parents=True, exist_ok=True)
            n = counts[c] if split == "train" else val_count
            paths = []
            for i in range(n):
                h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
                img = Image.fromarray(np.ascontiguousarray(photo_crop(c, num_classes, h, w, rng)))
                if rng.random() < 0.2:
                    img = img.convert("L")
                rel = f"{split}/{wnid(c)}/{wnid(c)}_{i}.JPEG"
                img.save(root / rel, format="JPEG", quality=90)
                paths.append(rel)
            out[split][wnid(c)] = paths
    return out
