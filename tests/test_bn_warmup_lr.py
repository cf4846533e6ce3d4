"""``norm.lr_after_switch``: the whitened phase of ``norm=bn_warmup`` has its own stepsize.

Read back from MLflow: ``train/lr`` (the first group's stepsize at each step) is ``optim.lr``
during the BN warm-up and ``lr_after_switch`` × the schedule's factor after the switch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rescalelab.callbacks.bn_warmup import continue_schedule
from rescalelab.optim.schedules import SmoothedPlateau
from tests.helpers import all_runs, assert_ok, history, run_cli

STEPS = 8  # TINY: 512 samples / batch 64


@pytest.mark.parametrize(
    ("schedule", "factor"),
    [("constant", lambda k: 1.0), ("halving", lambda k: 0.5 ** (k // 5))],
)
def test_after_the_switch_the_optimizer_uses_lr_after_switch(root, schedule, factor):
    args = [
        "norm=bn_warmup",
        "norm.warmup_epochs=1",
        "trainer.max_epochs=2",
        "optim.lr=0.1",
        "norm.lr_after_switch=0.03",
        f"schedule={schedule}",
        "trainer.log_every_n_steps=1",
    ]
    if schedule == "halving":
        args.append("schedule.every=5")  # the halvings continue across the switch (k = 5, 10, 15)
    assert_ok(run_cli(root, *args))
    (run,) = all_runs(root)
    lr = dict(history(root, run.info.run_id, "train/lr"))
    assert sorted(lr) == list(range(2 * STEPS))
    switch = history(root, run.info.run_id, "norm/switch_step")
    assert switch == [(STEPS, STEPS)]
    for k, v in lr.items():
        base = 0.1 if k < STEPS else 0.03
        assert v == pytest.approx(base * factor(k), rel=1e-6), k  # logged as float32


def test_without_lr_after_switch_the_stepsize_carries_on(root):
    proc = run_cli(
        root, "norm=bn_warmup", "norm.warmup_epochs=1", "trainer.max_epochs=2", "optim.lr=0.1",
        "trainer.log_every_n_steps=1",
    )  # fmt: skip
    assert_ok(proc)
    (run,) = all_runs(root)
    lr = [v for _, v in history(root, run.info.run_id, "train/lr")]
    assert len(lr) == 2 * STEPS and lr == pytest.approx([0.1] * len(lr), rel=1e-6)


def test_bad_lr_after_switch_is_one_line_and_exit_2(root):
    # 3 epochs: the 2 warm-up epochs leave whitened ones (else that cross-key check, which the
    # command line makes before the job checks the plug's own keys, answers first)
    proc = run_cli(root, "norm=bn_warmup", "norm.lr_after_switch=-1", "trainer.max_epochs=3")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == "error: norm.lr_after_switch=-1 is invalid: expected a number > 0 or null"
    assert all_runs(root) == []


def test_a_plateau_schedule_keeps_its_reductions_on_a_new_base_stepsize():
    """Non-LambdaLR schedules carry the ratio to the initial stepsize, not the old stepsize."""
    w = [nn.Parameter(torch.zeros(2))]
    old_opt = torch.optim.SGD([{"params": w, "lr": 0.1, "name": "a"}], lr=0.1)
    old = SmoothedPlateau(old_opt)
    old_opt.param_groups[0]["lr"] = 0.025  # two halvings so far
    new_opt = torch.optim.SGD([{"params": w, "lr": 0.03, "name": "a"}], lr=0.03)
    new = SmoothedPlateau(new_opt)
    continue_schedule(old, new)
    assert new_opt.param_groups[0]["lr"] == pytest.approx(0.03 / 4)
