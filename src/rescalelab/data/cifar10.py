"""``data=cifar10``: the CIFAR-10 python distribution, held as one uint8 tensor per split.

Reads ``<root>/cifar-10-batches-py/`` exactly as distributed (``data_batch_1`` … ``data_batch_5``,
``test_batch``, ``batches.meta``: pickles whose ``b'data'`` is uint8 ``[10000, 3072]`` in
R-then-G-then-B planes of 32×32 and ``b'labels'`` a list of ints). The batches are read
directly (torchvision's class insists on the md5 of the official files; ``verify=true`` does
that check here). The splits stay uint8 (50000×3×32×32 = 150 MB) and move to the training
device once; :mod:`rescalelab.data.augment` normalizes (μ_c, σ_c of the training split) and,
with ``augment=true``, crops with padding r and flips whole batches on the device, with a new
permutation every epoch drawn from (seed, epoch).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rescalelab.data.augment import channel_stats
from rescalelab.data.base import ImageDataModule
from rescalelab.data.checks import COUNT, FOLDER_PATH, MEAN, STD
from rescalelab.errors import FLAG, ConfigError, checked

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
LAYOUT = (
    f"expected {FOLDER}/{{data_batch_1..5,test_batch,batches.meta}} under data.root "
    f"(the CIFAR-10 python version, {URL}, unpacked; or set data.download=true)"
)


def find_batches(root: Path) -> Path:
    """The folder holding the batch files: ``root/cifar-10-batches-py`` or ``root`` itself."""
    for folder in (root / FOLDER, root):
        if (folder / TRAIN_FILES[0]).is_file():
            return folder
    return root / FOLDER


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, bytes, ints and numpy arrays.

    A pickle can name any importable callable; a damaged (or hostile) file would otherwise
    import modules and call them. Python 2 pickles are read with ``encoding="bytes"``.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which CIFAR-10 never holds")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict[bytes, Any]:
    """One CIFAR pickle (written by Python 2: keys come back as bytes)."""
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - damaged bytes raise almost any type
        detail = " ".join(str(e).split())[:200]  # one line, whatever the unpickler said
        raise ConfigError(
            f"data.root: cannot read {path} ({type(e).__name__}: {detail}): the file is truncated "
            f"or not a CIFAR-10 pickle; {LAYOUT}"
        ) from None
    if not isinstance(obj, dict):
        raise ConfigError(f"data.root: {path} is not a CIFAR-10 pickle; {LAYOUT}")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _int_labels(labels: object) -> bool:
    if isinstance(labels, np.ndarray):
        return labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)
    return isinstance(labels, list) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels
    )


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x uint8 [n, 3, 32, 32], y int64 [n])`` from one batch file."""
    d = read_pickle(path)
    if b"data" not in d or b"labels" not in d:
        raise ConfigError(f"data.root: {path} lacks the keys b'data' and b'labels'; {LAYOUT}")
    data, labels = d[b"data"], d[b"labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != 3072)
    ):
        found = f"{data.dtype}{list(data.shape)}" if isinstance(data, np.ndarray) else type(data)
        raise ConfigError(
            f"data.root: {path} has b'data' {found}, expected uint8 [n, 3072]; {LAYOUT}"
        )
    if not _int_labels(labels):
        raise ConfigError(
            f"data.root: {path} has b'labels' that are not a list of integers; {LAYOUT}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(data) or (len(labels) and not 0 <= labels.min() <= labels.max() <= 9):
        raise ConfigError(
            f"data.root: {path} has {len(labels)} labels for {len(data)} images "
            f"(expected one label in 0..9 per image); {LAYOUT}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _verify_md5(folder: Path) -> None:
    from torchvision.datasets import CIFAR10 as TV
    from torchvision.datasets.utils import check_integrity

    for name, md5 in [*TV.train_list, *TV.test_list, (TV.meta["filename"], TV.meta["md5"])]:
        if not check_integrity(str(folder / name), md5):
            raise ConfigError(
                f"data.verify=true: {folder / name} does not have the md5 of the official "
                f"file ({md5}); re-download it ({URL}) or set data.verify=false"
            )


def _subset(n_total: int, n: int | None, seed: int) -> torch.Tensor | None:
    """Indices of ``n`` samples drawn without replacement from (seed), in file order."""
    if n is None or n >= n_total:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


@checked(
    "data",
    root=FOLDER_PATH,
    download=FLAG,
    verify=FLAG,
    mean=MEAN,
    std=STD,
    num_train=COUNT,
    num_val=COUNT,
)
@dataclass(eq=False, kw_only=True)
class CIFAR10(ImageDataModule):
    """CIFAR-10 (3×32×32, 10 classes) from the python distribution under ``root``.

    ``num_train``/``num_val`` (``null``: all) keep a random subset drawn from the seed, for
    quick runs. ``mean``/``std`` (``null``: measured on the training split) are μ_c, σ_c in
    [0, 1] units. With ``augment=true`` training batches get a random crop with
    ``crop_padding`` r and, with ``flip=true``, random horizontal flips.
    """

    num_classes = 10
    input_shape = (3, 32, 32)

    root: str | Path = "data"
    download: bool = False
    verify: bool = False
    mean: list[float] | None = None
    std: list[float] | None = None
    num_train: int | None = None
    num_val: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_train is not None:
            self.check_batch(self.num_train, f"data.num_train={self.num_train}")
        self.root = Path(self.root).expanduser()
        self.classes: list[str] = []

    # -- reading ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        folder = find_batches(self.root)
        missing = [n for n in [*TRAIN_FILES, TEST_FILE, META_FILE] if not (folder / n).is_file()]
        if missing and self.download:
            from torchvision.datasets import CIFAR10 as TV

            try:
                TV(str(self.root), train=True, download=True)
            except Exception as e:  # no network, disk full, ...
                raise ConfigError(
                    f"data.download=true: downloading CIFAR-10 into {self.root} failed ({e})"
                ) from None

    def load(self) -> dict[str, torch.Tensor]:
        folder = find_batches(self.root)
        if not folder.is_dir():
            raise ConfigError(f"data.root={self.root} has no CIFAR-10 dataset: {LAYOUT}")
        missing = [n for n in [*TRAIN_FILES, TEST_FILE, META_FILE] if not (folder / n).is_file()]
        if missing:
            raise ConfigError(
                f"data.root={self.root}: CIFAR-10 is incomplete in {folder} "
                f"(missing {', '.join(missing)}); {LAYOUT}"
            )
        if self.verify:
            _verify_md5(folder)
        meta = read_pickle(folder / META_FILE)
        names = meta.get(b"label_names")
        if not isinstance(names, list) or len(names) != 10:
            raise ConfigError(
                f"data.root: {folder / META_FILE} lacks b'label_names' (10 names); {LAYOUT}"
            )
        self.classes = [
            n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names
        ]
        parts = [read_batch(folder / n) for n in TRAIN_FILES]
        x_train = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        y_train = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        xv, yv = read_batch(folder / TEST_FILE)
        x_val, y_val = torch.from_numpy(xv), torch.from_numpy(yv)
        if (idx := _subset(len(x_train), self.num_train, self.seed)) is not None:
            x_train, y_train = x_train[idx], y_train[idx]
        if (idx := _subset(len(x_val), self.num_val, self.seed + 1)) is not None:
            x_val, y_val = x_val[idx], y_val[idx]
        if self.mean is None or self.std is None:
            mean, std = channel_stats(x_train)
            self.mean, self.std = self.mean or mean, self.std or std
        return {
            "x_train": x_train.contiguous(),
            "y_train": y_train,
            "x_val": x_val.contiguous(),
            "y_val": y_val,
        }
