"""Divergence: the guard stops a run at the first bad step; in a sweep that job ends FAILED with
the divergence tags, and the other jobs still run and finish."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from rescalelab.callbacks.guard import Diverged, DivergenceGuard
from tests.helpers import all_runs, assert_ok, child_runs, client, history, run_cli


class Quadratic(pl.LightningModule):
    """f(w) = w² (L = 2) by plain gradient descent: w_{k+1} = (1 − 2α) w_k, so f_k = (1 − 2α)^{2k} f_0,
    which diverges exactly when α > 2/L = 1."""

    def __init__(self, lr: float, nan_at: int | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.lr, self.nan_at = lr, nan_at

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.w**2
        if self.nan_at is not None and self.global_step >= self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fit(module: pl.LightningModule, guard: DivergenceGuard, steps: int = 8) -> None:
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[guard], accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.zeros(steps, 1)))


@pytest.mark.parametrize("every", [1, 3])
def test_guard_stops_at_the_first_step_above_max_factor(every):
    # α = 1.5: f_k = 4^k f_0, and 4^2 = 16 is the first value above 10 f_0.
    with pytest.raises(Diverged) as e:
        _fit(Quadratic(lr=1.5), DivergenceGuard(max_factor=10.0, check_every_n_steps=every))
    assert e.value.step == 2
    assert e.value.loss == pytest.approx(16.0)
    assert "initial loss 1" in e.value.reason


def test_guard_lets_a_converging_run_finish():
    guard = DivergenceGuard(max_factor=10.0)
    _fit(Quadratic(lr=0.9), guard)  # |1 − 2α| = 0.8 < 1
    assert guard.initial_loss == pytest.approx(1.0)


def test_guard_stops_at_a_non_finite_loss_even_without_max_factor():
    with pytest.raises(Diverged, match=r"at step 3: loss=nan \(non-finite loss\)"):
        _fit(Quadratic(lr=0.1, nan_at=3), DivergenceGuard(max_factor=None))


def test_guard_state_survives_a_checkpoint():
    guard = DivergenceGuard()
    _fit(Quadratic(lr=0.1), guard, steps=2)
    again = DivergenceGuard()
    again.load_state_dict(guard.state_dict())
    assert again.initial_loss == guard.initial_loss == pytest.approx(1.0)


@pytest.mark.slow
def test_stepsize_sweep_where_one_job_diverges(root):
    # A stepsize far above the stability threshold between two sane ones.
    proc = run_cli(root, "-m", "optim.lr=0.05,100,0.02")
    assert_ok(proc)  # the sweep finished
    children = {float(r.data.params["optim.lr"]): r for r in child_runs(root)}
    assert sorted(children) == [0.02, 0.05, 100.0]
    for lr in (0.02, 0.05):
        assert children[lr].info.status == "FINISHED"
        assert children[lr].data.tags["rescalelab.status"] == "finished"
        assert math.isfinite(children[lr].data.metrics["val/loss"])
    bad = children[100.0]
    assert bad.info.status == "FAILED"
    tags = bad.data.tags
    assert tags["rescalelab.status"] == "diverged"
    step, loss = int(tags["rescalelab.diverged_step"]), float(tags["rescalelab.diverged_loss"])
    assert 1 <= step < 8  # 512 / 64 = 8 steps; step 0's loss is the reference f_0 ≈ log 10
    assert not math.isfinite(loss) or loss > 10 * 2.0
    # It stopped at once: nothing logged from the diverged step on, no checkpoint of it.
    assert all(s < step for s, _ in history(root, bad.info.run_id, "train/loss"))
    assert "val/loss" not in bad.data.metrics
    assert not list((Path(tags["rescalelab.output_dir"]) / "checkpoints").glob("*.ckpt"))
    # The parent finished, and its report marks the diverged configuration.
    (parent,) = [r for r in all_runs(root) if r.data.tags.get("rescalelab.sweep") == "parent"]
    assert parent.info.status == "FINISHED"
    report = Path(client(root).download_artifacts(parent.info.run_id, "report/children.csv"))
    rows = {float(r["optim.lr"]): r for r in csv.DictReader(report.open())}
    assert rows[100.0]["rescalelab.status"] == "diverged"
    assert rows[0.05]["rescalelab.status"] != "diverged"
