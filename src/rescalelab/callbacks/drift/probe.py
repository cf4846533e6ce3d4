"""Probe selection for the drift instruments: a fixed set of training inputs.

A *probe* is forwarded (no grad, train mode, dropout off, every buffer restored) through the
watched model every ``probe_every`` steps early on and at every epoch end; its batches give
near-noise-free population statistics μ*, σ*² and, from their spread, the sampling noise of one
batch. This module picks the probe's size and its examples.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch


def auto_probe(batch_size: int, steps_per_epoch: int, budget: float = 0.01) -> tuple[int, int]:
    """``(probe examples per rank, probe batch size)`` for ``probe_size: null``, from the
    training batch size per rank.

    A probe batch costs about half a training step (a no-grad forward), so ``budget`` of an
    epoch buys 2·budget·steps_per_epoch batches. At least two batches (the batch-to-batch spread
    gives the sampling noise): halves of the training batch when a whole one is over budget; at
    most 1024 examples. 78 steps per epoch at batch 128 (the synthetic default): 2 x 64;
    CIFAR-10's 391: 7 x 128.
    """
    whole = int(2 * budget * steps_per_epoch)
    if whole >= 2:
        k = max(2, min(whole, 1024 // max(batch_size, 1)))
        return k * batch_size, batch_size
    half = max(batch_size // 2, 1)
    return 2 * half, half


def probe_batches(
    trainer: pl.Trainer, size: int, batch_size: int, seed: int, device: torch.device
) -> list[torch.Tensor]:
    """A fixed set of ``size`` training inputs, this rank's share, in batches of ``batch_size``.

    The examples are a fixed random subset (a private generator, so no global RNG is touched)
    of the datamodule's ``tensors["x_train"]`` with its ``eval_transform`` (no augmentation), or
    else of the training dataset's items.
    """
    if size <= 0:
        return []
    rank, world = trainer.global_rank, trainer.world_size
    dm = getattr(trainer, "datamodule", None)
    g = torch.Generator().manual_seed(int(seed) * 7_777 + 17)
    tensors = getattr(dm, "tensors", None)
    if isinstance(tensors, dict) and "x_train" in tensors:
        x_all = tensors["x_train"]
        idx = torch.randperm(len(x_all), generator=g)[: min(size, len(x_all))]
        x = x_all[idx.to(x_all.device)]
        transform = dm.eval_transform() if hasattr(dm, "eval_transform") else None
        if transform is not None:
            x = transform(x, torch.Generator().manual_seed(int(seed)))
    else:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__"):
            return []
        idx = torch.randperm(len(dataset), generator=g)[:size].tolist()
        items = [dataset[i] for i in idx]
        x = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
    x = x.to(device)
    gb = batch_size * world
    out = []
    for k in range(len(x) // gb):
        block = x[k * gb : (k + 1) * gb]
        out.append(block[rank * batch_size : (rank + 1) * batch_size])
    return out
