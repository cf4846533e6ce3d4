"""Which images: a deterministic, stratified subset of an ImageFolder tree (no image is opened).

The classes are ``classes`` (explicit wnids) or ``num_classes`` of ``root/train``'s class folders
drawn from the seed (``None``: every class). Of every chosen class c with n_c images,
⌊f·n_c + ½⌋ (at least 1) are kept, f = ``fraction`` in ``train/`` and ``val_fraction`` in
``val/``, drawn by a generator seeded from (seed, split, wnid): the choice for one class never
depends on the others. :meth:`Subset.digest` is the sha256 of the class list and the exact file
list (the param ``data.subset_hash``).

The checks here are the ones only the folder can answer (does it exist, which classes does it
hold, is every class folder there and non-empty); the ranges of the keys are checked by
:class:`~rescalelab.data.imagenet.ImageNetSubset` when it is built (``errors.checked``).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rescalelab.errors import ConfigError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")


def layout_hint(root: Path) -> str:
    return (
        f"expected {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (ImageFolder layout: "
        f"the ILSVRC-2012 images from image-net.org, val/ sorted into one folder per class)"
    )


def seeded_rng(*key: object) -> np.random.Generator:
    """A numpy generator seeded by the sha256 of ``key`` (stable across processes and runs)."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def keep_count(fraction: float, n: int) -> int:
    """Images kept of a class with n images: ⌊f·n + ½⌋, at least 1 (0 when n = 0)."""
    return min(n, max(1, math.floor(fraction * n + 0.5))) if n else 0


def _images_in(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))


@dataclass
class Subset:
    """The chosen classes (label = index) and, per split, ``(path relative to root, label)``."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (split, path, error)

    def lines(self) -> list[str]:
        return [f"{split}\t{label}\t{path}" for split in SPLITS
                for path, label in getattr(self, split)]  # fmt: skip

    def digest(self) -> str:
        """sha256 (16 hex digits) of the class list and the exact file list."""
        h = hashlib.sha256(("\n".join(self.classes) + "\n\n").encode())
        h.update("\n".join(self.lines()).encode())
        return h.hexdigest()[:16]

    def write_tsv(self, path: Path) -> Path:
        path.write_text("split\tlabel\tpath\n" + "".join(f"{ln}\n" for ln in self.lines()))
        return path

    def drop(self, split: str, bad: dict[str, str]) -> None:
        """Leave out the files of ``split`` named in ``bad`` (path → error), recording them."""
        if bad:
            setattr(self, split, [(p, y) for p, y in getattr(self, split) if p not in bad])
            self.skipped += [(split, p, e) for p, e in sorted(bad.items())]


def list_classes(root: Path) -> list[str]:
    """The class folders of ``root/train`` (sorted); a one-line error if the layout is wrong."""
    train, val = root / "train", root / "val"
    if not root.is_dir():
        raise ConfigError(f"data.root={root} does not exist: {layout_hint(root)}")
    if not train.is_dir() or not val.is_dir():
        missing = " and ".join(p.name + "/" for p in (train, val) if not p.is_dir())
        raise ConfigError(f"data.root={root} lacks {missing}: {layout_hint(root)}")
    classes = sorted(e.name for e in os.scandir(train) if e.is_dir())
    if not classes:
        raise ConfigError(f"data.root={root}: train/ has no class folder: {layout_hint(root)}")
    return classes


def choose_classes(
    root: Path, classes: Sequence[str] | None, num_classes: int | None, seed: int
) -> list[str]:
    """The explicit ``classes`` (which must exist), or ``num_classes`` drawn from the seed."""
    found = list_classes(root)
    if classes:
        unknown = [c for c in classes if c not in found]
        if unknown:
            raise ConfigError(
                f"data.classes is invalid: {', '.join(map(str, unknown[:5]))} not found in "
                f"{root}/train ({len(found)} classes there)"
            )
        chosen = sorted(dict.fromkeys(str(c) for c in classes))
    elif num_classes is None or num_classes == len(found):
        chosen = found
    elif num_classes > len(found):
        raise ConfigError(
            f"data.num_classes={num_classes} is invalid: {root}/train has only "
            f"{len(found)} classes (set data.num_classes=null for all of them)"
        )
    else:
        pick = seeded_rng(seed, "classes").permutation(len(found))[:num_classes]
        chosen = sorted(found[i] for i in pick)
    if len(chosen) < 2:
        raise ConfigError(f"data.classes is invalid: expected at least 2 classes, got {chosen}")
    return chosen


def _class_files(root: Path, split: str, wnid: str) -> list[str]:
    folder = root / split / wnid
    if not folder.is_dir():
        raise ConfigError(
            f"data.root={root} is incomplete: {split}/{wnid}/ is missing; {layout_hint(root)}"
        )
    names = _images_in(folder)
    if not names:
        raise ConfigError(
            f"data.root={root} is incomplete: {split}/{wnid}/ has no image file "
            f"({', '.join(IMG_EXTENSIONS[:3])}, …); {layout_hint(root)}"
        )
    return names


def select_subset(
    root: Path,
    *,
    classes: Sequence[str] | None,
    num_classes: int | None,
    fraction: float,
    val_fraction: float,
    seed: int,
) -> Subset:
    """The deterministic stratified subset described in the module docstring."""
    chosen = choose_classes(root, classes, num_classes, seed)
    splits: dict[str, list[tuple[str, int]]] = {split: [] for split in SPLITS}
    for split, frac in zip(SPLITS, (fraction, val_fraction)):
        for label, wnid in enumerate(chosen):
            names = _class_files(root, split, wnid)
            keep = keep_count(frac, len(names))
            pick = np.sort(seeded_rng(seed, split, wnid).permutation(len(names))[:keep])
            splits[split] += [(f"{split}/{wnid}/{names[i]}", label) for i in pick]
    return Subset(chosen, splits["train"], splits["val"])
