"""Reading the image files: the one decoding of every image, the file check, the raw-folder
``Dataset``.

Every image is decoded the same way (:func:`decode_image`), by the cache builder and by the
raw-folder DataLoader alike, so both pipelines serve the same pixels. :func:`check_files` opens
every file of a subset before any run exists (``data.check``): a file that is not a readable
image stops with one line naming it, or with ``data.skip_corrupt=true`` is left out and recorded.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rescalelab.data.imagenet.pool import run_chunks
from rescalelab.data.imagenet.subset import SPLITS, Subset
from rescalelab.errors import ConfigError

CHUNK = 64  # images per task of the file check and the cache build


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """uint8 ``[3, size, size]``: RGB, shorter side resized to ``size`` (bilinear, antialiased
    when shrinking), centre crop. JPEGs are decoded at the smallest DCT scale (½, ¼, ⅛) that
    keeps both sides ≥ ``size``, which is what makes decoding fast."""
    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        rgb = im.convert("RGB")
    w, h = rgb.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        rgb = rgb.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def check_image(path: str | Path, mode: str) -> None:
    """Raise if the file is not a readable image: ``header`` parses it, ``decode`` also decodes
    it (at ⅛ scale for JPEGs), which catches truncated files."""
    with Image.open(path) as im:
        if min(im.size) < 1:
            raise OSError(f"empty image {im.size}")
        if mode == "decode":
            im.draft(im.mode, (1, 1))
            im.load()


def error_text(e: BaseException) -> str:
    """``Type: message`` on one line, without tabs (it goes into TSV files and error lines)."""
    return f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")


def _check_chunk(root: str, mode: str, paths: list[str]) -> list[tuple[str, str]]:
    errors = []
    for rel in paths:
        try:
            check_image(os.path.join(root, rel), mode)
        except Exception as e:  # noqa: BLE001 - a broken file raises almost any type
            errors.append((rel, error_text(e)))
    return errors


def check_files(
    root: Path, subset: Subset, mode: str, workers: int, skip_corrupt: bool, progress: bool
) -> None:
    """Check every file of ``subset``; drop the bad ones (``skip_corrupt``) or raise on the first."""
    for split in SPLITS:
        paths = [p for p, _ in getattr(subset, split)]
        bad: dict[str, str] = {}

        def record(errors: list[tuple[str, str]], chunk: list[str], bad=bad) -> None:
            for rel, err in errors:
                if not skip_corrupt:
                    raise ConfigError(
                        f"data.root: cannot read image {root / rel} ({err}); remove or replace "
                        f"it, or set data.skip_corrupt=true"
                    )
                bad[rel] = err

        size = max(CHUNK, len(paths) // max(workers * 8, 1) + 1)
        chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
        check = partial(_check_chunk, str(root), mode)
        run_chunks(check, chunks, record, workers=workers, description=f"checking {split}",
                   progress=progress)  # fmt: skip
        subset.drop(split, bad)


class ImageFiles(Dataset):
    """``(uint8 [3, S, S], label)`` decoded from ``root/path`` by :func:`decode_image`."""

    def __init__(self, root: Path, items: list[tuple[str, int]], size: int) -> None:
        self.root, self.items, self.size = root, items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.items[i]
        try:
            x = decode_image(self.root / rel, self.size)
        except Exception as e:
            raise RuntimeError(f"cannot decode image {self.root / rel} ({error_text(e)})") from e
        return torch.from_numpy(np.ascontiguousarray(x)), label
