"""Data order: epoch e's order and augmentation are a pure function of (seed, e) and change
from one epoch to the next, also when the consumer (Lightning) stops after ``len()`` batches
without exhausting the iterator."""

from __future__ import annotations

import torch

from rescalelab.data import TensorBatches
from tests.helpers import all_runs, assert_ok, history, run_cli


def _epoch_indices(batches: TensorBatches) -> torch.Tensor:
    """One epoch taken as Lightning takes it: exactly len() batches, the generator left open."""
    it = iter(batches)
    return torch.cat([next(it)[0] for _ in range(len(batches))])


def _flip_all(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random transform: + a draw from the batch's generator."""
    return x + torch.rand(len(x), generator=g)


def test_each_epoch_is_a_fresh_permutation_and_a_pure_function_of_seed_and_epoch():
    x = torch.arange(96)
    batches = TensorBatches(x, x, 16, shuffle=True, seed=3, drop_last=True)
    e0, e1, e2 = (_epoch_indices(batches) for _ in range(3))
    for e in (e0, e1, e2):
        assert sorted(e.tolist()) == list(range(96))  # a permutation: every sample once
    assert not torch.equal(e0, e1) and not torch.equal(e1, e2) and not torch.equal(e0, e2)
    # A fresh object told "epoch 1" (what a resume at an epoch boundary does) serves e1 again.
    again = TensorBatches(x, x, 16, shuffle=True, seed=3, drop_last=True)
    again.load_state_dict({"epoch": 1, "position": 0})
    assert torch.equal(_epoch_indices(again), e1)
    # Another seed, another order.
    other = TensorBatches(x, x, 16, shuffle=True, seed=4, drop_last=True)
    assert not torch.equal(_epoch_indices(other), e0)


def test_augmentation_draws_change_from_epoch_to_epoch():
    x = torch.zeros(64)
    batches = TensorBatches(x, x, 16, shuffle=False, transform=_flip_all, drop_last=True)
    a, b = _epoch_indices(batches), _epoch_indices(batches)
    assert not torch.allclose(a, b)


def test_a_frozen_model_sees_other_batches_every_epoch(root):
    """The issue's reproduction: with lr ~ 0 the per-step losses repeated with period 4."""
    assert_ok(
        run_cli(
            root,
            "optim.lr=1e-9",
            "optim.momentum=0",
            "data.num_train=256",
            "data.num_val=64",
            "data.batch_size=64",
            "trainer.max_epochs=3",
            "trainer.log_every_n_steps=1",
            tiny=False,
        )  # fmt: skip
    )
    (run,) = all_runs(root)
    losses = [v for _, v in history(root, run.info.run_id, "train/loss")]
    assert len(losses) == 12
    epochs = [losses[0:4], losses[4:8], losses[8:12]]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    # The frozen model's epoch means agree (same samples, other order): the data is the same set.
    means = [sum(e) / 4 for e in epochs]
    assert max(means) - min(means) < 0.05
