"""Batches sliced from tensors that already sit on the training device.

Every in-memory dataset (synthetic, CIFAR-10, digits, the ImageNet cache, the convex problems)
feeds training through :class:`TensorBatches`: one permutation per epoch drawn from
``seed + epoch``, then plain slicing. No per-sample Python work, no worker processes, and the
data order is a pure function of (seed, epoch), which is what makes runs reproducible and
resumable mid-epoch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch

BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class TensorBatches:
    """Iterable of ``(x, y)`` minibatches sliced from ``x`` and ``y``.

    Under DDP each rank takes every ``world_size``-th batch-sized block of one shared
    permutation, so the ranks see disjoint samples and together the global batch.
    ``state_dict`` holds the epoch and the position inside it, so a checkpoint taken
    mid-epoch resumes on the very next batch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        transform: BatchTransform | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._start = 0  # batches of this epoch already served (restored on resume)
        self._yielded: deque[tuple[int, int]] = deque()  # (epoch, k) served, not yet trained on
        self._consumed: tuple[int, int] | None = None  # (epoch, batches trained on) if marked

    def _global_batches(self) -> int:
        n, b = len(self.x), self.batch_size * self.world_size
        return n // b if self.drop_last else -(-n // b)

    def __len__(self) -> int:
        return self._global_batches()

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.x), device=self.x.device)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.x), generator=g).to(self.x.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Each pass is one epoch, and the epoch advances when the pass *starts*: Lightning
        # stops after len(self) batches and never exhausts the generator, so an epoch counter
        # advanced at the end would serve epoch 0's order (and crops and flips) forever.
        epoch = self.epoch
        order = self._order()
        self.epoch = epoch + 1
        base = self.seed * 7_919 + epoch * 104_729 + self.rank
        start, self._start = self._start, 0
        self._yielded.clear()
        gb = self.batch_size * self.world_size
        for k in range(start, self._global_batches()):
            block = order[k * gb : (k + 1) * gb]
            idx = block[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            # index_select, not x[idx]: the same rows, faster on CPU (no advanced-indexing
            # machinery), which is most of what feeding a small model costs per step.
            xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if self.transform is not None:
                # One generator per batch, so a pass resumed at batch k draws what it would have.
                xb = self.transform(xb, torch.Generator().manual_seed(base + k * 15_485_863))
            self._served = (epoch, k + 1)
            self._yielded.append((epoch, k))
            yield xb, yb

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def mark_consumed(self) -> None:
        """The consumer started training on the oldest batch served and not yet marked.

        Lightning fetches one batch ahead, so what was *served* runs ahead of what was
        *trained on*; :class:`~rescalelab.data.base.TensorDataModule` calls this from
        ``on_before_batch_transfer`` so that :meth:`state_dict` names the next batch to train on.
        """
        if self._yielded:
            epoch, k = self._yielded.popleft()
            self._consumed = (epoch, k + 1)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}`` of the next batch to train on (position 0 of the next
        epoch once an epoch is fully consumed)."""
        # What was trained on when the consumer marks it, else what was served.
        epoch, position = self._consumed or getattr(self, "_served", (self.epoch, self._start))
        if position >= self._global_batches():
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._start = int(state["epoch"]), int(state["position"])
        self._yielded.clear()
        self._consumed = (self.epoch, self._start)
