"""The DataModule contract every dataset option follows.

A dataset tells the model builder its ``input_shape`` and ``num_classes`` (so model configs
never repeat them), validates its own keys, and serves :class:`TensorBatches` (or, for image
folders, a DataLoader). ``setup`` does all file reading, so a missing or broken dataset fails
before any MLflow run exists.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from rescalelab.data.tensor_batches import BatchTransform, TensorBatches
from rescalelab.errors import ConfigError


def check_positive(key: str, value: float) -> None:
    """Raise a one-line :class:`ConfigError` unless ``value > 0``."""
    if not value > 0:
        raise ConfigError(f"{key}={value} is invalid: expected a number > 0")


def check_fraction(key: str, value: float) -> None:
    """Raise a one-line :class:`ConfigError` unless ``0 < value <= 1``."""
    if not 0 < value <= 1:
        raise ConfigError(f"{key}={value} is invalid: expected a fraction in (0, 1]")


class TensorDataModule(pl.LightningDataModule):
    """A dataset held as tensors ``(x_train, y_train, x_val, y_val)`` in memory.

    Subclasses implement :meth:`load` and return float (or uint8) tensors in NCHW layout.
    The tensors move to the training device once, in ``setup``'s first call from the trainer.
    """

    input_shape: tuple[int, ...]
    num_classes: int

    def __init__(self, batch_size: int = 128, seed: int = 0, val_batch_size: int | None = None):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"data.batch_size={batch_size} is invalid: expected an integer > 0")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or max(batch_size, 512)
        self.seed = seed
        self.tensors: dict[str, torch.Tensor] | None = None
        self._train: TensorBatches | None = None

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
        return {"num_train": len(self.tensors["x_train"]), "num_val": len(self.tensors["x_val"])}

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.tensors is None:
            self.tensors = self.load()
        if self.trainer is not None:
            device = self.trainer.strategy.root_device
            self.tensors = {k: v.to(device) for k, v in self.tensors.items()}

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> TensorBatches:
        assert self.tensors is not None
        if self._train is None:
            rank, world = self._rank()
            if self.batch_size % world:
                raise ConfigError(
                    f"data.batch_size={self.batch_size} is invalid: the global batch must "
                    f"divide across {world} ranks"
                )
            self._train = TensorBatches(
                self.tensors["x_train"],
                self.tensors["y_train"],
                self.batch_size // world,
                shuffle=True,
                seed=self.seed,
                drop_last=True,
                transform=self.train_transform(),
                rank=rank,
                world_size=world,
            )
            if getattr(self, "_pending_state", None) is not None:
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
        # over the batch saves ~30 us a step.
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


class ImageDataModule(TensorDataModule):
    """A uint8 image set: per-channel normalization by (mean, std), optional crop and flip.

    Subclasses set ``mean``, ``std`` (measured on the training split when not given),
    ``augment``, ``crop_padding`` and ``flip``; the transforms run on whole batches on the device.
    """

    mean: list[float] | None
    std: list[float] | None
    augment: bool
    crop_padding: int
    flip: bool

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
