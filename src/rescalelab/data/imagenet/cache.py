"""The decoded cache of a subset (``data.cache``): built once, resumably; memory-mapped by runs.

A cache folder holds, per split, ``<split>_x.u8`` (raw uint8 ``[n, 3, S, S]``, C order),
``<split>_y.npy`` (int64 labels) and ``<split>_done.u8`` (per image: 0 to do, 1 written,
2 unreadable and skipped), plus ``files.tsv`` (the exact file list, in array order) and
``manifest.json`` (format, the request it was built for, ``subset_hash``, counts, ``complete``,
skipped files). An image is marked done only after its chunk is flushed to disk, so a rebuild
after an interrupt decodes only what is left; a cache built for another request, or whose
source folder's files changed since (``subset_hash``), is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rescalelab.data.imagenet.files import CHUNK, decode_image, error_text
from rescalelab.data.imagenet.pool import run_chunks
from rescalelab.data.imagenet.subset import SPLITS, Subset
from rescalelab.errors import ConfigError

CACHE_FORMAT = 1
TODO, WRITTEN, SKIPPED = 0, 1, 2  # the states of <split>_done.u8


@dataclass(frozen=True)
class CacheSpec:
    """What a cache must have been built for: the subset request and the stored side S."""

    classes: list[str] | None
    num_classes: int | None
    fraction: float
    val_fraction: float
    seed: int
    store_size: int


def read_manifest(cache: Path) -> dict[str, Any] | None:
    """The cache's ``manifest.json`` (``None``: there is none)."""
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
    for key, want in asdict(spec).items():
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


def _decode_chunk(
    root: str, x_path: str, shape: tuple[int, ...], jobs: list[tuple[int, str]]
) -> list[tuple[int, str]]:
    """Decode ``jobs`` (index, path) into rows of the uint8 memmap at ``x_path``; return errors."""
    x = np.memmap(x_path, dtype=np.uint8, mode="r+", shape=shape)
    errors = []
    for i, rel in jobs:
        try:
            x[i] = decode_image(os.path.join(root, rel), shape[-1])
        except Exception as e:  # noqa: BLE001 - a broken file raises almost any type
            errors.append((i, error_text(e)))
    x.flush()
    del x
    return errors


def _start(root: Path, cache: Path, subset: Subset, spec: CacheSpec) -> dict[str, Any]:
    """The manifest of the cache in ``cache``: the existing one if it matches, else a new,
    empty cache (which needs an empty or new folder)."""
    subset_hash = subset.digest()
    manifest = read_manifest(cache)
    if manifest is not None:
        why = _mismatch(manifest, spec, subset_hash)
        if why:
            raise ConfigError(
                f"data.cache={cache} holds a different subset: built with {why}; "
                f"choose another data.cache folder or delete this one"
            )
        return manifest
    if cache.exists() and any(cache.iterdir()):
        raise ConfigError(
            f"data.cache={cache} is a non-empty folder without a manifest.json: not a cache; "
            f"choose an empty or new folder"
        )
    S = spec.store_size
    n = {split: len(getattr(subset, split)) for split in SPLITS}
    cache.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        np.memmap(cache / f"{split}_x.u8", np.uint8, "w+", shape=_shape(n[split], S)).flush()
        np.memmap(cache / f"{split}_done.u8", np.uint8, "w+", shape=(n[split],)).flush()
        labels = np.array([y for _, y in getattr(subset, split)], dtype=np.int64)
        np.save(cache / f"{split}_y.npy", labels)
    subset.write_tsv(cache / "files.tsv")
    manifest = {
        "format": CACHE_FORMAT, "spec": asdict(spec), "subset_hash": subset_hash,
        "classes": subset.classes, "counts": n, "shape": [3, S, S], "root": str(root),
        "complete": False, "skipped": [],
    }  # fmt: skip
    _write_manifest(cache, manifest)
    return manifest


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
    """Decode ``subset`` into ``cache`` (or finish an interrupted build); return the counts
    ``decoded`` (now), ``reused`` (already there) and ``skipped`` (unreadable)."""
    manifest = _start(root, cache, subset, spec)
    if manifest.get("complete"):
        return {"decoded": 0, "reused": sum(manifest["counts"].values()), "skipped": 0}
    counts = {"decoded": 0, "reused": 0, "skipped": 0}
    skipped: list[list[str]] = []
    for split in SPLITS:
        items, n = getattr(subset, split), manifest["counts"][split]
        done = np.memmap(cache / f"{split}_done.u8", np.uint8, "r+", shape=(n,))
        todo = np.flatnonzero(done == TODO).tolist()
        counts["reused"] += int((done == WRITTEN).sum())

        def record(errors: list[tuple[int, str]], jobs: list[tuple[int, str]], done=done,
                   items=items) -> None:  # fmt: skip
            bad = dict(errors)
            for j, _ in jobs:  # the good images of this chunk are kept, also on an error
                done[j] = (TODO if not skip_corrupt else SKIPPED) if j in bad else WRITTEN
            done.flush()
            if bad and not skip_corrupt:
                i, err = next(iter(bad.items()))
                raise ConfigError(
                    f"data.root: cannot decode image {root / items[i][0]} ({err}); remove or "
                    f"replace it (then rerun: the cache resumes), or set data.skip_corrupt=true"
                )
            counts["decoded"] += len(jobs) - len(bad)

        chunks = [[(i, items[i][0]) for i in todo[k : k + CHUNK]]
                  for k in range(0, len(todo), CHUNK)]  # fmt: skip
        decode = partial(_decode_chunk, str(root), str(cache / f"{split}_x.u8"),
                         _shape(n, spec.store_size))  # fmt: skip
        run_chunks(decode, chunks, record, workers=workers, description=f"decoding {split}",
                   progress=progress)  # fmt: skip
        skipped += [[split, items[i][0]] for i in np.flatnonzero(done == SKIPPED).tolist()]
        del done
    counts["skipped"] = len(skipped)
    manifest.update(complete=True, skipped=skipped)
    _write_manifest(cache, manifest)
    return counts


def open_cache(
    cache: Path, spec: CacheSpec, subset_hash: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the memory-mapped ``x`` (uint8) and ``y`` tensors of a complete cache
    (``subset_hash=None``: the source folder is absent, only the request is compared)."""
    manifest = read_manifest(cache)
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
    for split in SPLITS:
        n = manifest["counts"][split]
        x_file = cache / f"{split}_x.u8"
        if not x_file.is_file() or x_file.stat().st_size != n * 3 * S * S:
            raise ConfigError(f"data.cache={cache}: {x_file.name} is missing or has the wrong size")
        x = np.memmap(x_file, np.uint8, "c", shape=_shape(n, S))  # copy-on-write: never written
        y = np.load(cache / f"{split}_y.npy")
        keep = np.fromfile(cache / f"{split}_done.u8", dtype=np.uint8) == WRITTEN
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if not keep.all():
            idx = torch.from_numpy(np.flatnonzero(keep))
            xt, yt = xt[idx], yt[idx]
        tensors[f"x_{split}"], tensors[f"y_{split}"] = xt, yt
    return manifest, tensors
