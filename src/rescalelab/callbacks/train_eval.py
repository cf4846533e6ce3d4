"""``callbacks.train_eval``: the training cost as the lecture measures it.

``train/loss`` is the minibatch loss of the step, in *train* mode: BatchNorm normalizes with the
statistics of the batch itself, dropout is on, augmentation is applied, and the weights change
within the epoch. The lecture's "training cost" is the cost of the network as it is, on the
training set. At the end of every ``every_n_epochs``-th training epoch this callback therefore
runs one no-grad pass in *eval* mode (BN with its running statistics, whitening's hooks off)
over the training samples of :meth:`~rescalelab.data.base.TensorDataModule.train_eval_indices`
(the whole set up to 10 000 samples, else ``data.train_eval_size`` of them drawn from the seed),
with the eval transform (no crop or flip) and the training labels (noisy ones included), and logs

    train_eval/loss = (1/n) Σ_k ℓ(f(x_k), y_k),   train_eval/acc = (1/n) Σ_k [argmax f(x_k) = y_k]

with ``ℓ`` the module's loss (cross-entropy, or a convex problem's objective, in which case no
accuracy). Under DDP each rank takes a contiguous slice, and the per-rank sums
``[Σ ℓ, Σ correct, n]`` are summed over ranks in one collective, so every rank logs the full
set's numbers. The pass consumes no random numbers, so training is unchanged by it.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from rescalelab.errors import ConfigError, at_least, checked, required


@checked("callbacks.train_eval", every_n_epochs=required(at_least(1)))
class TrainEval(pl.Callback):
    """Log ``train_eval/loss`` and ``train_eval/acc`` after every ``every_n_epochs`` epochs."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs and not trainer.should_stop:
            return
        loss, acc = evaluate_training_set(trainer, pl_module)
        pl_module.log("train_eval/loss", loss)
        if acc is not None:
            pl_module.log("train_eval/acc", acc)


@torch.no_grad()
def evaluate_training_set(
    trainer: pl.Trainer, pl_module: pl.LightningModule
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mean loss, accuracy or None)`` of ``pl_module`` in eval mode over the training pass."""
    datamodule: Any = trainer.datamodule
    if not hasattr(datamodule, "train_eval_batches"):
        raise ConfigError(
            f"callbacks.train_eval is invalid with data ({type(datamodule).__name__}): it "
            "serves no train_eval_batches"
        )
    objective = getattr(datamodule, "objective", None)
    device = pl_module.device
    # float64 sums (MPS has none): 10k losses summed in float32 would lose digits.
    dtype = torch.float32 if device.type == "mps" else torch.float64
    sums = torch.zeros(3, dtype=dtype, device=device)  # Σ loss, Σ correct, n
    was_training = pl_module.training
    pl_module.eval()
    try:
        with trainer.precision_plugin.forward_context():
            for x, y in datamodule.train_eval_batches(trainer.global_rank, trainer.world_size):
                x, y = x.to(device), y.to(device)
                out = pl_module(x)
                if objective is not None:
                    sums[0] += objective(out, y, pl_module.model).to(dtype) * len(y)
                else:
                    sums[0] += F.cross_entropy(out.float(), y, reduction="sum").to(dtype)
                    sums[1] += (out.argmax(dim=1) == y).sum()
                sums[2] += len(y)
    finally:
        pl_module.train(was_training)
    if trainer.world_size > 1:
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
    n = sums[2].clamp_min(1)
    loss = (sums[0] / n).float()
    return loss, None if objective is not None else (sums[1] / n).float()
