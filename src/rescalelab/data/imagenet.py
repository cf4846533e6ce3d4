"""``data=imagenet_subset``: a deterministic, stratified subset of an ImageNet-style image folder.

**Layout.** ``data.root`` holds ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (torchvision's
ImageFolder layout; ILSVRC-2012's flat ``val/`` must first be sorted into class folders).

**Subset.** The classes are ``data.classes`` (an explicit list of wnids) or ``data.num_classes``
of them drawn from the seed (``null``: every class). Of every chosen class c with n_c images,
⌊f·n_c + ½⌋ (at least 1) images are kept, f = ``data.fraction`` for train/ and
``data.val_fraction`` for val/, drawn from a generator seeded by (seed, split, wnid) — so the
choice for one class never depends on the others. ``fraction=0.1`` over the 1000 classes is the
lecture's "10 % of ImageNet". The exact list (split, label, path) is written to
``subset_files.tsv`` (logged as a run artifact) and its sha256 is the param
``data.subset_hash``.

**Pixels.** Every image is decoded once the same way (:func:`decode_image`): RGB, shorter side
resized to S = ``data.resize_size`` (default ⌊image_size · 256/224 + ½⌋, AlexNet's 256 for 224),
centre-cropped to S×S, uint8. Training batches are then randomly cropped to ``image_size`` and
flipped on the device, validation batches centre-cropped (:mod:`rescalelab.data.augment`), and
normalized with μ_c, σ_c (``data.mean``/``data.std``, ImageNet's by default).

**Two pipelines.**

* ``data.cache=<dir>``: :func:`build_cache` (``rescalelab-prepare-imagenet``) decodes the subset
  once, in parallel and resumably, into ``<split>_x.u8`` (raw uint8 ``[n, 3, S, S]``),
  ``<split>_y.npy``, ``files.tsv`` and ``manifest.json``; runs memory-map it and serve
  :class:`~rescalelab.data.tensor_batches.TensorBatches` like every in-memory dataset.
* no cache: a torch ``DataLoader`` with ``data.num_workers`` worker processes decodes the files
  every epoch into pinned memory; crop/flip/normalize run on the device after the transfer.

Bad files: ``setup`` checks every file of the subset (``data.check=decode`` decodes each at ⅛
scale, ``header`` only parses it) before any run exists. An unreadable file stops with one line
naming it, or with ``data.skip_corrupt=true`` is left out and counted (``data.num_skipped``).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rescalelab.data.augment import ImageBatchTransform
from rescalelab.data.base import (
    TensorDataModule,
    check_fraction,
    noisy_labels,
    write_label_noise,
)
from rescalelab.data.tensor_batches import BatchTransform, TensorBatches
from rescalelab.errors import ConfigError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHUNK = 64  # images per decoding task


def layout_hint(root: Path) -> str:
    return (
        f"expected {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (ImageFolder layout: "
        f"the ILSVRC-2012 images from image-net.org, val/ sorted into one folder per class)"
    )


def default_resize(image_size: int) -> int:
    """S = ⌊image_size · 256/224 + ½⌋: the stored side, AlexNet's 256 for a 224 crop."""
    return int(image_size * 256 / 224 + 0.5)


# -- subset selection ---------------------------------------------------------------------------
def _rng(*key: object) -> np.random.Generator:
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
        return [f"{split}\t{label}\t{path}" for split in ("train", "val")
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
    else:
        if num_classes > len(found):
            raise ConfigError(
                f"data.num_classes={num_classes} is invalid: {root}/train has only "
                f"{len(found)} classes (set data.num_classes=null for all of them)"
            )
        chosen = sorted(
            found[i] for i in _rng(seed, "classes").permutation(len(found))[:num_classes]
        )
    if len(chosen) < 2:
        raise ConfigError(f"data.classes is invalid: expected at least 2 classes, got {chosen}")
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for split, frac in (("train", fraction), ("val", val_fraction)):
        for label, wnid in enumerate(chosen):
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
            pick = np.sort(
                _rng(seed, split, wnid).permutation(len(names))[: keep_count(frac, len(names))]
            )
            splits[split] += [(f"{split}/{wnid}/{names[i]}", label) for i in pick]
    return Subset(chosen, splits["train"], splits["val"])


# -- decoding -----------------------------------------------------------------------------------
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


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")


def _check_chunk(root: str, paths: list[str], mode: str) -> list[tuple[str, str]]:
    errors = []
    for rel in paths:
        try:
            check_image(os.path.join(root, rel), mode)
        except Exception as e:
            errors.append((rel, _error_text(e)))
    return errors


def _decode_chunk(
    root: str, x_path: str, shape: tuple[int, ...], jobs: list[tuple[int, str]]
) -> list[tuple[int, str]]:
    """Decode ``jobs`` (index, path) into rows of the uint8 memmap at ``x_path``; return errors."""
    x = np.memmap(x_path, dtype=np.uint8, mode="r+", shape=shape)
    errors = []
    for i, rel in jobs:
        try:
            x[i] = decode_image(os.path.join(root, rel), shape[-1])
        except Exception as e:
            errors.append((i, _error_text(e)))
    x.flush()
    del x
    return errors


class _Inline(Executor):
    """Runs tasks in the calling process (``workers <= 1``)."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:
            fut.set_exception(e)
        return fut


def _executor(workers: int) -> Executor:
    if workers <= 1:
        return _Inline()
    # fork: the workers need only PIL and numpy, and must not re-import torch (seconds each)
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks.*")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _run_tasks(
    tasks: Iterable[tuple[Callable, tuple, int]],
    workers: int,
    description: str,
    total: int,
    on_result: Callable[[Any, tuple], None],
    progress: bool,
) -> None:
    """Run ``fn(*args)`` for every task (``size`` images each) with a progress bar, calling
    ``on_result(result, args)`` in the main process as each finishes. At most 2·workers tasks
    are in flight, so results are recorded (and resumable) as the work proceeds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ["{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    bar = Progress(*columns, disable=not progress, transient=False, redirect_stdout=False)
    task_iter = iter(tasks)
    with bar, _executor(workers) as pool:
        tid = bar.add_task(description, total=total)
        pending: dict[Future, tuple[tuple, int]] = {}
        try:
            while True:
                while len(pending) < max(2 * workers, 1):
                    nxt = next(task_iter, None)
                    if nxt is None:
                        break
                    fn, args, size = nxt
                    pending[pool.submit(fn, *args)] = (args, size)
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    args, size = pending.pop(fut)
                    on_result(fut.result(), args)
                    bar.advance(tid, size)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def check_files(
    root: Path, subset: Subset, mode: str, workers: int, skip_corrupt: bool, progress: bool
) -> None:
    """Check every file of ``subset``; drop the bad ones (``skip_corrupt``) or raise on the first."""
    for split in ("train", "val"):
        paths = [p for p, _ in getattr(subset, split)]
        bad: dict[str, str] = {}

        def record(errors: list[tuple[str, str]], args: tuple, bad=bad) -> None:
            for rel, err in errors:
                if not skip_corrupt:
                    raise ConfigError(
                        f"data.root: cannot read image {root / rel} ({err}); remove or replace "
                        f"it, or set data.skip_corrupt=true"
                    )
                bad[rel] = err

        chunk = max(CHUNK, len(paths) // max(workers * 8, 1) + 1)
        tasks = ((_check_chunk, (str(root), paths[i : i + chunk], mode), len(paths[i : i + chunk]))
                 for i in range(0, len(paths), chunk))  # fmt: skip
        _run_tasks(tasks, workers, f"checking {split}", len(paths), record, progress)
        subset.drop(split, bad)


# -- the cache ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheSpec:
    """What a cache must have been built for: the subset request and the stored side S."""

    classes: list[str] | None
    num_classes: int | None
    fraction: float
    val_fraction: float
    seed: int
    store_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes, "num_classes": self.num_classes, "fraction": self.fraction,
            "val_fraction": self.val_fraction, "seed": self.seed, "store_size": self.store_size,
        }  # fmt: skip


def _read_manifest(cache: Path) -> dict[str, Any] | None:
    path = cache / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.cache={cache}: cannot read manifest.json ({e})") from None


def _write_manifest(cache: Path, manifest: dict[str, Any]) -> None:
    tmp = cache / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(cache / "manifest.json")


def _mismatch(manifest: dict[str, Any], spec: CacheSpec, subset_hash: str | None) -> str | None:
    """Why the cache was built for another subset (``None``: it matches)."""
    if manifest.get("format") != CACHE_FORMAT:
        return f"format {manifest.get('format')} (this version reads {CACHE_FORMAT})"
    built = manifest.get("spec", {})
    for key, want in spec.as_dict().items():
        if built.get(key) != want:
            return f"{key}={built.get(key)!r} (requested {want!r})"
    if subset_hash is not None and manifest.get("subset_hash") != subset_hash:
        return (
            f"subset_hash={manifest.get('subset_hash')} (the folder now gives {subset_hash}: its "
            f"files changed)"
        )
    return None


def _shape(n: int, size: int) -> tuple[int, int, int, int]:
    return (n, 3, size, size)


def build_cache(
    root: Path,
    cache: Path,
    subset: Subset,
    spec: CacheSpec,
    *,
    workers: int = 4,
    skip_corrupt: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Decode ``subset`` into ``cache`` (see the module docstring); return counts.

    Resumable: ``<split>_done.u8`` marks each image written (1) or unreadable (2) as soon as its
    chunk is flushed, so a rerun after an interrupt decodes only what is left. A cache whose
    manifest was built for another subset or size is refused.
    """
    subset_hash = subset.digest()
    manifest = _read_manifest(cache)
    if manifest is not None:
        why = _mismatch(manifest, spec, subset_hash)
        if why:
            raise ConfigError(
                f"data.cache={cache} holds a different subset: built with {why}; "
                f"choose another data.cache folder or delete this one"
            )
        if manifest.get("complete"):
            return {"decoded": 0, "reused": sum(manifest["counts"].values()), "skipped": 0}
    elif cache.exists() and any(cache.iterdir()):
        raise ConfigError(
            f"data.cache={cache} is a non-empty folder without a manifest.json: not a cache; "
            f"choose an empty or new folder"
        )
    S = spec.store_size
    n = {"train": len(subset.train), "val": len(subset.val)}
    if manifest is None:
        cache.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            np.memmap(cache / f"{split}_x.u8", np.uint8, "w+", shape=_shape(n[split], S)).flush()
            np.memmap(cache / f"{split}_done.u8", np.uint8, "w+", shape=(n[split],)).flush()
            labels = np.array([y for _, y in getattr(subset, split)], dtype=np.int64)
            np.save(cache / f"{split}_y.npy", labels)
        subset.write_tsv(cache / "files.tsv")
        manifest = {
            "format": CACHE_FORMAT, "spec": spec.as_dict(), "subset_hash": subset_hash,
            "classes": subset.classes, "counts": n, "shape": [3, S, S], "root": str(root),
            "complete": False, "skipped": [],
        }  # fmt: skip
        _write_manifest(cache, manifest)
    counts = {"decoded": 0, "reused": 0, "skipped": 0}
    skipped: list[list[str]] = []
    for split in ("train", "val"):
        items = getattr(subset, split)
        done = np.memmap(cache / f"{split}_done.u8", np.uint8, "r+", shape=(n[split],))
        todo = np.flatnonzero(done == 0).tolist()
        counts["reused"] += int((done == 1).sum())
        x_path = str(cache / f"{split}_x.u8")

        def record(errors: list[tuple[int, str]], args: tuple, done=done, items=items) -> None:
            bad = dict(errors)
            if bad and not skip_corrupt:
                i, err = next(iter(bad.items()))
                for j, _ in args[3]:  # the good images of this chunk are kept
                    done[j] = 0 if j in bad else 1
                done.flush()
                raise ConfigError(
                    f"data.root: cannot decode image {root / items[i][0]} ({err}); remove or "
                    f"replace it (then rerun: the cache resumes), or set data.skip_corrupt=true"
                )
            for j, _ in args[3]:
                done[j] = 2 if j in bad else 1
            done.flush()
            counts["decoded"] += len(args[3]) - len(bad)

        tasks = ((_decode_chunk, (str(root), x_path, _shape(n[split], S), jobs), len(jobs))
                 for jobs in ([(i, items[i][0]) for i in todo[k : k + CHUNK]]
                              for k in range(0, len(todo), CHUNK)))  # fmt: skip
        _run_tasks(tasks, workers, f"decoding {split}", len(todo), record, progress)
        for i in np.flatnonzero(done == 2).tolist():
            skipped.append([split, items[i][0]])
        del done
    counts["skipped"] = len(skipped)
    manifest.update(complete=True, skipped=skipped)
    _write_manifest(cache, manifest)
    return counts


def open_cache(
    cache: Path, spec: CacheSpec, subset_hash: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the memory-mapped ``x`` (uint8) and ``y`` tensors of a complete cache."""
    manifest = _read_manifest(cache)
    if manifest is None:
        raise ConfigError(f"data.cache={cache} holds no cache (no manifest.json)")
    why = _mismatch(manifest, spec, subset_hash)
    if why:
        raise ConfigError(
            f"data.cache={cache} holds a different subset: built with {why}; rebuild it into "
            f"another folder with rescalelab-prepare-imagenet"
        )
    if not manifest.get("complete"):
        raise ConfigError(
            f"data.cache={cache} is incomplete (its build was interrupted): rerun "
            f"rescalelab-prepare-imagenet with the same options to finish it"
        )
    S = spec.store_size
    tensors = {}
    for split in ("train", "val"):
        n = manifest["counts"][split]
        x_file = cache / f"{split}_x.u8"
        if not x_file.is_file() or x_file.stat().st_size != n * 3 * S * S:
            raise ConfigError(f"data.cache={cache}: {x_file.name} is missing or has the wrong size")
        x = np.memmap(x_file, np.uint8, "c", shape=_shape(n, S))  # copy-on-write: never written
        y = np.load(cache / f"{split}_y.npy")
        keep = np.fromfile(cache / f"{split}_done.u8", dtype=np.uint8) == 1
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if not keep.all():
            idx = torch.from_numpy(np.flatnonzero(keep))
            xt, yt = xt[idx], yt[idx]
        tensors[f"x_{split}"], tensors[f"y_{split}"] = xt, yt
    return manifest, tensors


# -- the raw-folder pipeline --------------------------------------------------------------------
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
            raise RuntimeError(f"cannot decode image {self.root / rel} ({_error_text(e)})") from e
        return torch.from_numpy(np.ascontiguousarray(x)), label


# -- the DataModule -----------------------------------------------------------------------------
class ImageNetSubset(TensorDataModule):
    """A subset of an ImageFolder tree, from a prepared cache or decoded on the fly.

    ``num_classes`` (``null``: every class of ``root/train``) or ``classes`` (explicit wnids),
    ``fraction``/``val_fraction`` of the images of every class, chosen from ``seed``.
    ``image_size`` is the side fed to the model; images are stored at ``resize_size``.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        cache: str | None = None,
        fraction: float = 0.1,
        val_fraction: float = 1.0,
        num_classes: int | None = 1000,
        classes: list[str] | None = None,
        image_size: int = 224,
        resize_size: int | None = None,
        augment: bool = True,
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        check: str = "decode",
        skip_corrupt: bool = False,
        num_workers: int = 4,
        progress: bool = True,
        batch_size: int = 128,
        seed: int = 0,
        label_noise: float = 0.0,
        train_eval_size: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size, seed=seed, label_noise=label_noise,
            train_eval_size=train_eval_size,
        )  # fmt: skip
        check_fraction("data.fraction", fraction)
        check_fraction("data.val_fraction", val_fraction)
        if classes is not None:
            classes = [str(c) for c in classes]
        if classes:
            num_classes = len(dict.fromkeys(classes))
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ConfigError(
                f"data.num_classes={num_classes} is invalid: expected null or an integer >= 2"
            )
        if not isinstance(image_size, int) or image_size < 8:
            raise ConfigError(f"data.image_size={image_size} is invalid: expected an integer >= 8")
        resize_size = default_resize(image_size) if resize_size is None else resize_size
        if not isinstance(resize_size, int) or resize_size < image_size:
            raise ConfigError(
                f"data.resize_size={resize_size} is invalid: expected null or an integer >= "
                f"data.image_size={image_size}"
            )
        if check not in ("decode", "header"):
            raise ConfigError(f"data.check={check!r} is invalid: expected one of: decode, header")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(
                f"data.num_workers={num_workers} is invalid: expected an integer >= 0"
            )
        for key, v in (("data.mean", mean), ("data.std", std)):
            if len(v) != 3:
                raise ConfigError(f"{key}={list(v)} is invalid: expected 3 numbers")
        self.root = Path(root).expanduser()
        self.cache = None if cache in (None, "") else Path(cache).expanduser()
        self.fraction, self.val_fraction = float(fraction), float(val_fraction)
        self.classes_requested = classes or None
        self.num_classes_requested = None if classes else num_classes
        self.num_classes = num_classes or 0  # known after setup when null
        self.image_size, self.resize_size = image_size, resize_size
        self.input_shape = (3, image_size, image_size)
        self.augment, self.flip = augment, flip
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.check, self.skip_corrupt = check, skip_corrupt
        self.num_workers, self.progress = num_workers, progress
        self.subset: Subset | None = None
        self.subset_hash: str | None = None
        self.manifest: dict[str, Any] | None = None
        self.artifacts: dict[str, Path] = {}
        self._aug_epoch: tuple[int, torch.Generator] | None = None

    @property
    def spec(self) -> CacheSpec:
        return CacheSpec(
            self.classes_requested, self.num_classes_requested, self.fraction, self.val_fraction,
            self.seed, self.resize_size,
        )  # fmt: skip

    def select(self) -> Subset:
        """List the folder and choose the subset (no image is opened)."""
        return select_subset(
            self.root, classes=self.classes_requested, num_classes=self.num_classes_requested,
            fraction=self.fraction, val_fraction=self.val_fraction, seed=self.seed,
        )  # fmt: skip

    def prepare_cache(self, workers: int | None = None, progress: bool | None = None) -> dict:
        """Build (or finish) ``data.cache`` for this subset; what ``rescalelab-prepare-imagenet`` runs."""
        if self.cache is None:
            raise ConfigError("data.cache=null is invalid here: expected the cache folder to build")
        subset = self.select()
        return build_cache(
            self.root, self.cache, subset, self.spec,
            workers=self.num_workers if workers is None else workers,
            skip_corrupt=self.skip_corrupt,
            progress=self.progress if progress is None else progress,
        )  # fmt: skip

    def _prepare_command(self) -> str:
        parts = [f"data.root={self.root}", f"data.cache={self.cache}"]
        parts += [f"data.fraction={self.fraction}", f"data.val_fraction={self.val_fraction}"]
        if self.classes_requested:
            parts.append(f"data.classes=[{','.join(self.classes_requested)}]")
        else:
            parts.append(f"data.num_classes={self.num_classes_requested or 'null'}")
        parts += [f"data.image_size={self.image_size}", f"data.resize_size={self.resize_size}"]
        return "rescalelab-prepare-imagenet " + " ".join(parts + [f"seed={self.seed}"])

    # -- setup: all file reading happens here, before any run exists --------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.subset is None and self.manifest is None:
            if self.cache is not None:
                self._setup_cache()
            else:
                self._setup_folder()
        if self.cache is not None:
            super().setup(stage)

    def _setup_cache(self) -> None:
        assert self.cache is not None
        if _read_manifest(self.cache) is None:
            raise ConfigError(
                f"data.cache={self.cache} does not exist yet: build it first with "
                f"`{self._prepare_command()}`"
            )
        subset_hash = self.select().digest() if self.root.is_dir() else None
        self.manifest, self.tensors = open_cache(self.cache, self.spec, subset_hash)
        self.num_classes = len(self.manifest["classes"])
        self.artifacts = {"subset_files.tsv": self.cache / "files.tsv"}
        self._check_batch(len(self.tensors["x_train"]))

    def _setup_folder(self) -> None:
        subset = self.select()
        self.subset_hash = subset.digest()
        check_files(
            self.root, subset, self.check, self.num_workers, self.skip_corrupt, self.progress
        )
        self.subset, self.num_classes = subset, len(subset.classes)
        out = Path(tempfile.mkdtemp(prefix="rescalelab-subset-"))  # logged, then removed at exit
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        self.artifacts = {"subset_files.tsv": subset.write_tsv(out / "subset_files.tsv")}
        if subset.skipped:
            skipped = out / "subset_skipped.tsv"
            skipped.write_text("split\tpath\terror\n" + "".join(
                f"{s}\t{p}\t{e}\n" for s, p, e in subset.skipped))  # fmt: skip
            self.artifacts["subset_skipped.tsv"] = skipped
        if self.label_noise:  # the folder's labels are the file list's: redraw them there
            clean = torch.tensor([label for _, label in subset.train])
            noisy, self.replaced = noisy_labels(
                clean, self.num_classes, self.label_noise, self.seed
            )
            subset.train = [(path, y) for (path, _), y in zip(subset.train, noisy.tolist())]
            self.artifacts["label_noise.tsv"] = write_label_noise(clean, noisy, self.replaced)
        self._check_batch(len(subset.train))

    def _check_batch(self, n_train: int) -> None:
        if self.batch_size > n_train:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is invalid: expected <= the {n_train} "
                f"training images of the subset"
            )

    def describe(self) -> dict[str, Any]:
        common = {"num_classes": self.num_classes, "resize_size": self.resize_size}
        if self.manifest is not None:
            assert self.tensors is not None
            return {
                **common, "source": "cache", "subset_hash": self.manifest["subset_hash"],
                "num_train": len(self.tensors["x_train"]), "num_val": len(self.tensors["x_val"]),
                "num_skipped": len(self.manifest.get("skipped", [])),
            }  # fmt: skip
        assert self.subset is not None
        return {
            **common, "source": "folder", "subset_hash": self.subset_hash,
            "num_train": len(self.subset.train), "num_val": len(self.subset.val),
            "num_skipped": len(self.subset.skipped),
        }  # fmt: skip

    # -- transforms ------------------------------------------------------------------------------
    def train_transform(self) -> BatchTransform:
        if not self.augment:
            return self.eval_transform()
        return ImageBatchTransform(
            self.mean, self.std, size=self.image_size, random_crop=True, flip=self.flip
        )

    def eval_transform(self) -> BatchTransform:
        return ImageBatchTransform(self.mean, self.std, size=self.image_size)

    # -- loaders ---------------------------------------------------------------------------------
    def folder_loader(
        self, split: str, batch_size: int, train: bool, pin: bool | None = None
    ) -> DataLoader:
        """The raw-folder ``DataLoader`` of ``split`` (uint8 ``[B, 3, S, S]`` batches, shuffled
        from the seed when ``train``); pinned memory when training on a GPU."""
        assert self.subset is not None
        if pin is None:
            pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            ImageFiles(self.root, getattr(self.subset, split), self.resize_size),
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> TensorBatches | DataLoader:
        if self.cache is not None:
            return super().train_dataloader()
        assert self.subset is not None
        rank, world = self._rank()
        if self.batch_size % world:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is invalid: the global batch must divide "
                f"across {world} ranks"
            )
        self._train_tf = self.train_transform()
        return self.folder_loader("train", self.batch_size // world, train=True)

    def val_dataloader(self) -> TensorBatches | DataLoader:
        if self.cache is not None:
            return super().val_dataloader()
        assert self.subset is not None
        self._eval_tf = self.eval_transform()
        return self.folder_loader("val", self.val_batch_size, train=False)

    def train_eval_batches(self, rank: int = 0, world_size: int = 1) -> Iterable[Any]:
        if self.cache is not None:
            return super().train_eval_batches(rank, world_size)
        assert self.subset is not None
        idx = self.train_eval_indices(len(self.subset.train)).tolist()
        idx = idx[rank * len(idx) // world_size : (rank + 1) * len(idx) // world_size]
        files = ImageFiles(self.root, [self.subset.train[i] for i in idx], self.resize_size)
        loader = DataLoader(files, batch_size=self.val_batch_size, num_workers=self.num_workers)
        device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
        transform = self.eval_transform()
        return ((transform(x.to(device)), y.to(device)) for x, y in loader)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Raw-folder batches arrive as uint8 on the device: crop, flip, normalize them here
        (cached batches were transformed by :class:`TensorBatches` already)."""
        if self.cache is not None or self.trainer is None:
            return batch
        x, y = batch
        if self.trainer.training:
            epoch, rank = self.trainer.current_epoch, self.trainer.global_rank
            if self._aug_epoch is None or self._aug_epoch[0] != epoch:
                seed = self.seed * 7_919 + epoch * 104_729 + rank
                self._aug_epoch = (epoch, torch.Generator().manual_seed(seed))
            return self._train_tf(x, self._aug_epoch[1]), y
        return self._eval_tf(x), y


# -- rescalelab-prepare-imagenet ------------------------------------------------------------------
USAGE = """usage: rescalelab-prepare-imagenet [data.KEY=VALUE ...] [seed=N]

Decode a subset of an ImageNet-style folder once into data.cache, for data=imagenet_subset.
Takes the same overrides as rescalelab-train, e.g.

  rescalelab-prepare-imagenet data.root=/data/imagenet data.cache=/data/cache/in10 \\
      data.fraction=0.1 data.image_size=224 data.num_workers=16

Interrupted builds resume when rerun; a folder built for another subset is refused.
"""


def main(argv: list[str] | None = None) -> int:
    """Compose ``data=imagenet_subset`` with the given overrides and build its cache."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from hydra.utils import instantiate

    from rescalelab.resolvers import composing
    from rescalelab.validate import validate

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    cwd = os.getcwd()  # paths.* as the trainer would set them (nothing is written there)
    overrides = ["data=imagenet_subset", f"paths.root={cwd}", f"paths.output_dir={cwd}", *args]
    try:
        with composing(), initialize_config_module("rescalelab.conf", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        validate(cfg)
        dm: ImageNetSubset = instantiate(cfg.data)
        counts = dm.prepare_cache()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except HydraException as e:
        cause = e.__cause__
        msg = str(cause) if isinstance(cause, ConfigError) else str(e).strip().splitlines()[-1]
        print(f"error: {msg}", file=sys.stderr)
        return 2
    manifest = _read_manifest(dm.cache)  # type: ignore[arg-type]
    assert manifest is not None
    print(
        f"cache {dm.cache}: {manifest['counts']['train']} train + {manifest['counts']['val']} "
        f"val images of {len(manifest['classes'])} classes at {dm.resize_size}px, subset "
        f"{manifest['subset_hash']} ({counts['decoded']} decoded now, {counts['reused']} "
        f"reused, {len(manifest['skipped'])} skipped)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
