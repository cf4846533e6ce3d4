"""The comparison baselines through the CLI: every new method trains to FINISHED on small_cnn
and resnet20, the tuned schedule logs its closed-form stepsizes, and the BN → whitening switch
on ResNet-20 is exact and keeps warmup_cosine on course (docs/baselines.md).

Runs are grouped into multiruns (one process each) on tiny 16×16 data: one or two steps per
epoch, so the whole file costs a few CLI start-ups.
"""

from __future__ import annotations

import math

import pytest

from tests.helpers import assert_ok, child_runs, history, run_cli

SMALL = [
    "data.image_size=16", "data.num_train=64", "data.num_val=64", "data.batch_size=64",
    "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
]  # fmt: skip
METHODS = ["sgd_tuned", "adamw", "layernorm", "groupnorm", "weightnorm", "batch_renorm", "soap",
           "muon"]  # fmt: skip


def _finished(root) -> list:
    runs = child_runs(root)
    for r in runs:
        assert r.info.status == "FINISHED", (r.data.params.get("method"), r.data.tags)
        loss = history(root, r.info.run_id, "train/loss")
        assert loss and all(math.isfinite(v) for _, v in loss)
    return runs


@pytest.mark.slow  # 16 jobs in one process: ~1 min of CPU time
def test_every_new_method_trains_on_small_cnn_and_resnet20(root):
    proc = run_cli(
        root, "-m", "model=small_cnn,resnet20", f"method={','.join(METHODS)}",
        "trainer.max_epochs=2", *SMALL, tiny=False,
    )  # fmt: skip
    assert_ok(proc)
    runs = _finished(root)
    seen = {(r.data.params["model._target_"].rsplit(".", 1)[-1], r.data.params["norm._target_"],
             r.data.params["optim._target_"]) for r in runs}  # fmt: skip
    assert len(runs) == 16 and len(seen) == 16
    checked = 0
    for r in runs:  # sgd_tuned: W = 1 step of warm-up from 0.01 α, then cosine over P − W = 1
        tuned = r.data.params["schedule._target_"].endswith("warmup_cosine")
        if r.data.params["optim._target_"] == "torch.optim.SGD" and tuned:
            checked += 1
            assert r.data.params["optim.nesterov"] == "True"
            lr = history(root, r.info.run_id, "train/lr")
            assert lr == [(0, pytest.approx(0.1 * 0.01)), (1, pytest.approx(0.1))]
    assert checked == 2  # small_cnn and resnet20


def test_bn_warmup_on_resnet20_switches_exactly_and_the_schedule_continues(root):
    proc = run_cli(
        root, "model=resnet20", "norm=bn_warmup", "norm.warmup_epochs=1", "norm.init_batches=1",
        "schedule=warmup_cosine", "schedule.warmup_epochs=1", "optim.lr=0.05",
        "trainer.max_epochs=2", *SMALL, "data.num_train=128", tiny=False,
    )  # fmt: skip
    assert_ok(proc)
    (run,) = _finished(root)
    rid = run.info.run_id
    assert history(root, rid, "norm/switch_step") == [(2, 2.0)]
    (_, before), (_, after) = (history(root, rid, f"norm/loss_{w}_switch")[0]
                               for w in ("before", "after"))  # fmt: skip
    assert after == pytest.approx(before, rel=1e-5)
    # W = 2, P = 4: α (0.01, 0.505, 1, 0.5), the optimizer rebuilt at k = 2 on the folded network
    want = [0.05 * f for f in (0.01, 0.505, 1.0, 0.5)]
    assert [v for _, v in history(root, rid, "train/lr")] == pytest.approx(want, rel=1e-6)


def test_whitening_and_nesterov_on_resnet20(root):
    proc = run_cli(
        root, "-m", "model=small_cnn,resnet20", "norm=whitening", "optim.momentum=0.9",
        "optim.nesterov=true", "trainer.max_epochs=1", *SMALL, tiny=False,
    )  # fmt: skip
    assert_ok(proc)
    assert len(_finished(root)) == 2
