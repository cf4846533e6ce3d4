"""A training curve for every run: ``train/loss_epoch`` / ``train/acc_epoch`` are the means over
every step of the epoch, and step-level logging happens at least once per epoch.

The resume side (a run killed mid-epoch logs each epoch mean once, with the whole epoch's value)
is covered by tests/test_resume.py, which compares every metric's history, these included, with
an uninterrupted run.
"""

from __future__ import annotations

import pytest

from tests.helpers import all_runs, assert_ok, child_runs, history, run_cli

STEPS = 8  # TINY: 512 samples / batch 64


def test_epoch_means_are_the_means_of_every_step(root):
    proc = run_cli(root, "trainer.max_epochs=2", "trainer.log_every_n_steps=1")
    assert_ok(proc)
    (run,) = all_runs(root)
    rid = run.info.run_id
    loss, acc = dict(history(root, rid, "train/loss")), dict(history(root, rid, "train/acc"))
    assert sorted(loss) == list(range(2 * STEPS))  # every step logged: the formula's terms
    for key, per_step in (("train/loss_epoch", loss), ("train/acc_epoch", acc)):
        curve = history(root, rid, key)
        assert [s for s, _ in curve] == [STEPS - 1, 2 * STEPS - 1]  # the epochs' last steps
        for epoch, (_, value) in enumerate(curve):
            steps = range(epoch * STEPS, (epoch + 1) * STEPS)
            assert value == pytest.approx(sum(per_step[k] for k in steps) / STEPS, rel=1e-5)


def test_the_log_interval_is_capped_at_the_epoch_and_the_cli_says_so(root):
    proc = run_cli(root, "trainer.max_epochs=2", "trainer.log_every_n_steps=50")
    assert_ok(proc)
    line = f"trainer.log_every_n_steps=50 exceeds the {STEPS} steps of an epoch: logging every {STEPS} steps"
    assert line in proc.stderr + proc.stdout
    (run,) = all_runs(root)
    rid = run.info.run_id
    assert [s for s, _ in history(root, rid, "train/loss")] == [STEPS - 1, 2 * STEPS - 1]
    assert len(history(root, rid, "train/loss_epoch")) == 2
    assert len(history(root, rid, "train/acc_epoch")) == 2
    # A short interval is left alone (no message).
    proc = run_cli(root, "trainer.max_epochs=1", "trainer.log_every_n_steps=3")
    assert_ok(proc)
    assert "exceeds the" not in proc.stderr + proc.stdout


def test_max_steps_mid_epoch_still_gives_the_cut_epoch_its_point(root):
    proc = run_cli(
        root, "trainer.max_epochs=2", "+trainer.max_steps=11", "trainer.log_every_n_steps=1"
    )
    assert_ok(proc)
    (run,) = all_runs(root)
    rid = run.info.run_id
    loss = dict(history(root, rid, "train/loss"))
    curve = history(root, rid, "train/loss_epoch")
    assert [s for s, _ in curve] == [STEPS - 1, 10]
    assert curve[1][1] == pytest.approx(sum(loss[k] for k in range(STEPS, 11)) / 3, rel=1e-5)


@pytest.mark.slow
def test_the_documented_quick_look_gives_every_child_a_curve(root):
    """README / issue 16: ``-m norm=none,bn,whitening data.num_train=1000 data.num_val=200
    trainer.max_epochs=3`` (7 steps an epoch against log_every_n_steps=50), shrunk to 4 steps."""
    proc = run_cli(
        root, "-m", "norm=none,bn,whitening", "data.num_train=512", "data.num_val=100",
        "trainer.max_epochs=3", "trainer.enable_progress_bar=false", tiny=False,
    )  # fmt: skip
    assert_ok(proc)
    assert "trainer.log_every_n_steps=50 exceeds the 4 steps of an epoch" in proc.stderr
    children = child_runs(root)
    assert len(children) == 3
    for r in children:
        for key in ("train/loss_epoch", "train/acc_epoch", "train/loss"):
            assert [s for s, _ in history(root, r.info.run_id, key)] == [3, 7, 11], key


def test_under_gradient_accumulation_each_optimizer_step_is_logged_once(root):
    # 8 batches, 2 a step: 4 optimizer steps; every 2nd step (k = 1, 3) is a logging step, written
    # once although two micro-batches ran it, with the stepsize and the epoch beside it.
    proc = run_cli(
        root, "trainer.max_epochs=1", "+trainer.accumulate_grad_batches=2",
        "trainer.log_every_n_steps=2", "optim.lr=0.07",
    )  # fmt: skip
    assert_ok(proc)
    (run,) = all_runs(root)
    rid = run.info.run_id
    for key in ("train/loss", "train/acc", "train/lr", "epoch"):
        assert [s for s, _ in history(root, rid, key)] == [1, 3], key
    assert [v for _, v in history(root, rid, "train/lr")] == pytest.approx([0.07, 0.07])
    assert [s for s, _ in history(root, rid, "train/loss_epoch")] == [3]
