"""The DataModule contract every dataset option follows.

A dataset tells the model builder its ``input_shape`` and ``num_classes`` (so model configs
never repeat them), checks what only the data can tell (files, counts), and serves
:class:`TensorBatches` (or, for image folders, a DataLoader). ``setup`` does all file reading,
so a missing or broken dataset fails before any MLflow run exists.

``label_noise`` (every image option) turns a dataset into a memorization task (Zhang et al.
2017): right after the training split is loaded, ``round(p × n_train)`` training samples chosen
from the seed get a label drawn uniformly from the ``K`` classes (so a fraction ``p (1 − 1/K)``
actually changes; ``p = 1`` is random labels). Validation labels stay clean. The replaced
indices, with their clean and new labels, are the artifact ``data/label_noise.tsv``.
``train_eval_size`` sizes the clean eval-mode pass over the training set that
``callbacks.train_eval`` logs as ``train_eval/loss`` (see :meth:`TensorDataModule.train_eval_batches`).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from rescalelab.data.checks import COUNT, SEED
from rescalelab.data.tensor_batches import BatchTransform, TensorBatches
from rescalelab.errors import FLAG, ConfigError, Expect, at_least, checked

TRAIN_EVAL_DEFAULT = 10_000  # train_eval_size=null: the whole set up to this many samples


def noisy_labels(
    y: torch.Tensor, num_classes: int, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, replaced)``: ``round(fraction × n)`` labels, at indices drawn from ``seed``,
    replaced by labels drawn uniformly from ``num_classes`` (a stream of its own, so the data
    itself and the training order do not move); ``replaced`` is sorted."""
    g = torch.Generator().manual_seed(seed * 1_000_033 + 20_170_101)
    n = len(y)
    replaced = torch.randperm(n, generator=g)[: round(fraction * n)].sort().values
    new = torch.randint(0, num_classes, (len(replaced),), generator=g).to(y.dtype)
    out = y.clone()
    out[replaced.to(y.device)] = new.to(y.device)
    return out, replaced


def write_label_noise(clean: torch.Tensor, noisy: torch.Tensor, replaced: torch.Tensor) -> Path:
    """The artifact of the replaced labels (``index, clean, label``), in a folder removed at exit."""
    out = Path(tempfile.mkdtemp(prefix="rescalelab-label-noise-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    c, z = clean.cpu()[replaced].tolist(), noisy.cpu()[replaced].tolist()
    rows = "".join(f"{i}\t{a}\t{b}\n" for i, a, b in zip(replaced.tolist(), c, z))
    path = out / "label_noise.tsv"
    path.write_text("index\tclean\tlabel\n" + rows)
    return path


@checked(
    "data",
    batch_size=COUNT,
    seed=SEED,
    label_noise=Expect(float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    train_eval_size=at_least(1, "null or an integer >= 1"),
)
@dataclass(eq=False, kw_only=True)
class TensorDataModule(pl.LightningDataModule):
    """A dataset held as tensors ``(x_train, y_train, x_val, y_val)`` in memory.

    The constructor's keyword arguments are the fields of the dataclass: the keys of the
    ``conf/data/<name>.yaml`` that targets it, declared once where they belong (the ones every
    dataset takes here, a dataset's own in its class). Subclasses are ``@dataclass(eq=False,
    kw_only=True)`` too, decorated with :func:`rescalelab.errors.checked` *above* the dataclass
    (``@checked("data", key=Expect, ...)``, or ``@checked("data")`` for no key of their own:
    the generated ``__init__`` then checks the keys of the class and of its bases), finish their
    construction in :meth:`__post_init__` and implement :meth:`load`, which returns float (or
    uint8) tensors in NCHW layout; they also set ``input_shape`` and ``num_classes`` (class
    attributes or set in ``__post_init__``). Each key's range is declared once, beside its
    field (:mod:`rescalelab.data.checks` holds the ones several classes share): a call checks
    it, and :func:`rescalelab.validate.check_targets` applies it to the config before anything
    is built. ``__post_init__`` checks only what involves the data themselves or several keys
    together (``data.batch_size`` against the training samples).
    The tensors move to the training device once, in ``setup``'s first call from the trainer.
    """

    batch_size: int = 128
    seed: int = 0
    val_batch_size: int | None = None
    label_noise: float = 0.0
    train_eval_size: int | None = None

    def __post_init__(self) -> None:
        super().__init__()
        self.label_noise = float(self.label_noise)
        self.val_batch_size = self.val_batch_size or max(self.batch_size, 512)
        self.replaced: torch.Tensor | None = None  # training indices whose label was redrawn
        self.artifacts: dict[str, Path] = {}  # logged under data/ by fit.py
        self.tensors: dict[str, torch.Tensor] | None = None
        self._train: TensorBatches | None = None
        self._pending_state: dict[str, Any] | None = None  # a resumed position, until served

    def check_batch(self, n_train: int, what: str | None = None) -> None:
        """``data.batch_size`` must not exceed the ``n_train`` training samples (``what``
        names where that count comes from, e.g. ``data.num_train=512``)."""
        if self.batch_size > n_train:
            what = what or f"the {n_train} training samples"
            raise ConfigError(f"data.batch_size={self.batch_size} is invalid: expected <= {what}")

    # -- to implement -------------------------------------------------------------------
    def load(self) -> dict[str, torch.Tensor]:
        """Return ``{"x_train", "y_train", "x_val", "y_val"}`` on the CPU."""
        raise NotImplementedError

    def train_transform(self) -> BatchTransform | None:
        """Whole-batch transform for training batches (augmentation, normalization)."""
        return None

    def eval_transform(self) -> BatchTransform | None:
        """Whole-batch transform for validation batches (normalization only)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Facts about the data worth logging as MLflow params (sizes, hashes)."""
        assert self.tensors is not None
        facts = {"num_train": len(self.tensors["x_train"]), "num_val": len(self.tensors["x_val"])}
        if self.replaced is not None:
            facts["num_noisy_labels"] = len(self.replaced)
        return facts

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.tensors is None:
            self.tensors = self.load()
        self.check_batch(len(self.tensors["x_train"]))
        self._add_label_noise()
        if self.trainer is not None:
            device = self.trainer.strategy.root_device
            self.tensors = {k: v.to(device) for k, v in self.tensors.items()}

    def _add_label_noise(self) -> None:
        """Redraw ``label_noise`` of the training labels, once (setup runs more than once)."""
        if self.label_noise == 0 or self.replaced is not None or self.tensors is None:
            return
        clean = self.tensors["y_train"]
        noisy, self.replaced = noisy_labels(clean, self.num_classes, self.label_noise, self.seed)
        self.tensors = {**self.tensors, "y_train": noisy}
        self.artifacts["label_noise.tsv"] = write_label_noise(clean, noisy, self.replaced)

    def train_eval_indices(self, n_train: int) -> torch.Tensor:
        """The training samples of the clean pass: all of them when ``train_eval_size`` is null
        and ``n_train <= 10 000``, else a fixed sorted subset of that size drawn from the seed."""
        size = self.train_eval_size
        if size is None:
            size = min(n_train, TRAIN_EVAL_DEFAULT)
        if size >= n_train:
            return torch.arange(n_train)
        g = torch.Generator().manual_seed(self.seed * 1_000_037 + 31_337)
        return torch.randperm(n_train, generator=g)[:size].sort().values

    def train_eval_batches(self, rank: int = 0, world_size: int = 1) -> Iterable[Any]:
        """Batches ``(x, y)`` of this rank's contiguous slice of :meth:`train_eval_indices`, with
        the *eval* transform (no augmentation) and the training labels (noisy ones included)."""
        assert self.tensors is not None
        x, y = self.tensors["x_train"], self.tensors["y_train"]
        idx = self.train_eval_indices(len(x))
        lo, hi = rank * len(idx) // world_size, (rank + 1) * len(idx) // world_size
        if len(idx) == len(x):  # the whole set: a view, no copy
            x, y = x[lo:hi], y[lo:hi]
        else:
            idx = idx[lo:hi].to(x.device)
            x, y = x.index_select(0, idx), y.index_select(0, idx)
        return TensorBatches(
            x,
            y,
            self.val_batch_size,
            shuffle=False,
            transform=self.eval_transform(),
        )

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def rank_batch(self) -> tuple[int, int, int]:
        """``(rank, world size, per-rank batch)``: the global ``data.batch_size`` split evenly
        over the ranks the trainer actually runs."""
        rank, world = self._rank()
        if self.batch_size % world:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is invalid: the global batch must "
                f"divide across {world} ranks"
            )
        return rank, world, self.batch_size // world

    def train_batches_class(self) -> type[TensorBatches]:
        """How training batches are drawn: :class:`TensorBatches` (a permutation per epoch)."""
        return TensorBatches

    def train_dataloader(self) -> TensorBatches:
        assert self.tensors is not None
        if self._train is None:
            rank, world, batch = self.rank_batch()
            self._train = self.train_batches_class()(
                self.tensors["x_train"],
                self.tensors["y_train"],
                batch,
                shuffle=True,
                seed=self.seed,
                drop_last=True,
                transform=self.train_transform(),
                rank=rank,
                world_size=world,
            )
            if self._pending_state is not None:  # resumed mid-run
                self._train.load_state_dict(self._pending_state)
        return self._train

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this as a training step takes its batch: the data position a
        # checkpoint records is what was trained on, not what was prefetched.
        if self.trainer is not None and self.trainer.training and self._train is not None:
            self._train.mark_consumed()
        return batch

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # TensorBatches serve (x, y) already on the device: skipping Lightning's generic walk
        # over the batch saves per-step Python that a small model's step feels.
        if isinstance(batch, (tuple, list)) and all(
            isinstance(t, torch.Tensor) and t.device == device for t in batch
        ):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> TensorBatches:
        assert self.tensors is not None
        rank, world = self._rank()
        # Under DDP each rank evaluates its own contiguous slice (never empty, no sample twice);
        # val metrics are then summed over ranks (torchmetrics), so they are the full set's.
        n = len(self.tensors["x_val"])
        lo, hi = rank * n // world, (rank + 1) * n // world
        return TensorBatches(
            self.tensors["x_val"][lo:hi],
            self.tensors["y_val"][lo:hi],
            self.val_batch_size,
            shuffle=False,
            transform=self.eval_transform(),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"train_batches": self._train.state_dict()} if self._train else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "train_batches" in state:
            self._pending_state = state["train_batches"]
            if self._train is not None:
                self._train.load_state_dict(self._pending_state)


@checked("data", augment=FLAG, crop_padding=at_least(0), flip=FLAG)
@dataclass(eq=False, kw_only=True)
class ImageDataModule(TensorDataModule):
    """A uint8 image set: per-channel normalization by (mean, std), optional crop and flip.

    With ``augment``, training batches are cropped at a random offset after zero-padding by
    r = ``crop_padding`` and, with ``flip``, mirrored with probability ½; the transforms run on
    whole batches on the device. Subclasses set ``mean``, ``std`` (μ_c, σ_c in [0, 1] units;
    measured on the training split when not given) in :meth:`load`.
    """

    augment: bool = True
    crop_padding: int = 4
    flip: bool = True
    # not keys unless a subclass declares them again as init fields (CIFAR-10 does)
    mean: list[float] | None = field(default=None, init=False)
    std: list[float] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mean = None if self.mean is None else [float(v) for v in self.mean]
        self.std = None if self.std is None else [float(v) for v in self.std]

    def train_transform(self) -> BatchTransform:
        from rescalelab.data.augment import ImageBatchTransform

        if not self.augment:
            return self.eval_transform()
        return ImageBatchTransform(
            self.mean, self.std, size=self.input_shape[-1], padding=self.crop_padding,
            random_crop=self.crop_padding > 0, flip=self.flip,
        )  # fmt: skip

    def eval_transform(self) -> BatchTransform:
        from rescalelab.data.augment import ImageBatchTransform

        return ImageBatchTransform(self.mean, self.std)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mean": self.mean, "std": self.std}
