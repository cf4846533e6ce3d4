"""The ``data=imagenet_subset`` DataModule: a subset of an ImageFolder tree, from a prepared
cache or decoded on the fly.

With ``data.cache``, ``setup`` memory-maps the cache (:mod:`~rescalelab.data.imagenet.cache`) and
the tensors are served by :class:`~rescalelab.data.tensor_batches.TensorBatches` like every
in-memory dataset. Without it, ``setup`` checks every file of the subset
(:func:`~rescalelab.data.imagenet.files.check_files`) and a torch ``DataLoader`` with
``num_workers`` processes decodes the files every epoch into (pinned) memory; crop, flip and
normalization (μ_c, σ_c) run on the device after the transfer (``on_after_batch_transfer``).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from rescalelab.data.augment import ImageBatchTransform
from rescalelab.data.base import TensorDataModule, noisy_labels, write_label_noise
from rescalelab.data.checks import CLASSES, FOLDER_PATH, FRACTION, IMAGE_SIZE, MEAN, STD, folder
from rescalelab.data.imagenet.cache import CacheSpec, build_cache, open_cache, read_manifest
from rescalelab.data.imagenet.files import ImageFiles, check_files
from rescalelab.data.imagenet.subset import Subset, select_subset
from rescalelab.data.tensor_batches import BatchTransform, TensorBatches
from rescalelab.errors import FLAG, ConfigError, at_least, checked, one_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_resize(image_size: int) -> int:
    """S = ⌊image_size · 256/224 + ½⌋: the stored side, AlexNet's 256 for a 224 crop."""
    return int(image_size * 256 / 224 + 0.5)


@checked(
    "data",
    root=FOLDER_PATH,
    cache=folder("a folder or null"),
    fraction=FRACTION,
    val_fraction=FRACTION,
    num_classes=at_least(2),
    classes=CLASSES,
    image_size=IMAGE_SIZE,
    resize_size=at_least(8, "an integer >= 8 or null"),
    augment=FLAG,
    flip=FLAG,
    mean=MEAN,
    std=STD,
    check=one_of("decode", "header"),
    skip_corrupt=FLAG,
    num_workers=at_least(0),
    progress=FLAG,
)
@dataclass(eq=False, kw_only=True)
class ImageNetSubset(TensorDataModule):
    """A subset of an ImageFolder tree, from a prepared cache or decoded on the fly.

    ``num_classes`` (``null``: every class of ``root/train``) or ``classes`` (explicit wnids),
    ``fraction``/``val_fraction`` of the images of every class, chosen from ``seed``.
    ``image_size`` is the side fed to the model; images are stored at ``resize_size``.
    """

    root: str | Path = "data/imagenet"
    cache: str | Path | None = None
    fraction: float = 0.1
    val_fraction: float = 1.0
    num_classes: int | None = 1000
    classes: Sequence[str] | None = None
    image_size: int = 224
    resize_size: int | None = None
    augment: bool = True
    flip: bool = True
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    check: str = "decode"
    skip_corrupt: bool = False
    num_workers: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        classes = None if self.classes is None else [str(c) for c in self.classes]
        if self.resize_size is None:
            self.resize_size = default_resize(self.image_size)
        elif self.resize_size < self.image_size:  # a rule across two keys
            raise ConfigError(
                f"data.resize_size={self.resize_size} is invalid: expected null or an integer "
                f">= data.image_size={self.image_size}"
            )
        self.root = Path(self.root).expanduser()
        self.cache = None if self.cache is None else Path(self.cache).expanduser()
        self.fraction, self.val_fraction = float(self.fraction), float(self.val_fraction)
        self.classes_requested = classes or None
        self.num_classes_requested = None if classes else self.num_classes
        # the class count: known now when the classes are named, after setup when null
        self.num_classes = len(dict.fromkeys(classes)) if classes else (self.num_classes or 0)
        self.input_shape = (3, self.image_size, self.image_size)
        self.mean, self.std = [float(v) for v in self.mean], [float(v) for v in self.std]
        self.subset: Subset | None = None
        self.subset_hash: str | None = None
        self.manifest: dict[str, Any] | None = None
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
        if read_manifest(self.cache) is None:
            raise ConfigError(
                f"data.cache={self.cache} does not exist yet: build it first with "
                f"`{self._prepare_command()}`"
            )
        subset_hash = self.select().digest() if self.root.is_dir() else None
        self.manifest, self.tensors = open_cache(self.cache, self.spec, subset_hash)
        self.num_classes = len(self.manifest["classes"])
        self.artifacts = {"subset_files.tsv": self.cache / "files.tsv"}

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
        self.check_batch(len(subset.train))

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
        _, _, batch = self.rank_batch()
        self._train_tf = self.train_transform()
        return self.folder_loader("train", batch, train=True)

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
