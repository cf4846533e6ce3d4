"""Distributed whitening under ``trainer=ddp_cpu`` (2 gloo ranks), against one process: the
statistics μ, Var and the drift statistics are those of the global batch, and bn_warmup's switch
happens on both ranks at the same step. (Its own file, apart from tests/test_ddp.py, so that
pytest-xdist's ``--dist loadfile`` can run the two on two workers.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import assert_ok, history, run_cli
from tests.test_ddp import (
    DRIFT,
    DUMP,
    EPOCHS,
    ROUNDING,
    _assert_once_per_step,
    _diffs,
    _final_state,
    _jobs,
    _max_diff,
    _replicas,
)

NORMS = ["whitening", "bn_warmup"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, migrated_db) -> tuple[Path, dict]:
    """One process, the same global batch: norm=whitening, bn_warmup (one multirun)."""
    root = tmp_path_factory.mktemp("single")
    shutil.copy(migrated_db, root / "mlflow.db")
    assert_ok(run_cli(root, "-m", "trainer=cpu", f"norm={','.join(NORMS)}", *DRIFT, *EPOCHS))
    jobs = _jobs(root)
    assert sorted(jobs) == [f"norm={n}" for n in sorted(NORMS)]
    return root, jobs


@pytest.mark.slow
def test_ddp_whitening_statistics_are_global_and_the_switch_is_simultaneous(root, reference):
    """Whitening μ, Var all-reduced: identical on both ranks and equal to one process's."""
    proc = run_cli(root, "-m", "trainer=ddp_cpu", "norm=whitening,bn_warmup", DUMP, *DRIFT, *EPOCHS)
    assert_ok(proc)
    ref_root, ref = reference
    jobs = _jobs(root)
    assert sorted(jobs) == ["norm=bn_warmup", "norm=whitening"]
    for name, (run, job_dir) in jobs.items():
        assert run.info.status == "FINISHED"
        _assert_once_per_step(root, run)
        r0, r1 = _replicas(job_dir)
        stats = [k for k in r0["state"] if k.endswith(("rescale_mean", "rescale_var"))]
        updates = [r0["state"][k] for k in r0["state"] if k.endswith("rescale_updates")]
        assert stats and min(int(u) for u in updates) > 0
        assert _max_diff(r0["state"], r1["state"], r0["state"]) <= 1e-6  # params and μ, Var
        assert set(r0["state"]) == set(_final_state(ref[name][1]))
    # norm=whitening: statistics of the global batch (not of rank 0's half, which DDP's buffer
    # broadcast would spread), and the same function, gradients and steps as one process.
    run, job_dir = jobs["norm=whitening"]
    r0, _ = _replicas(job_dir)
    ref_state = _final_state(ref["norm=whitening"][1])
    assert _max_diff(r0["state"], ref_state, stats) < 1e-4
    for key in ("train/loss", "val/loss"):
        assert max(_diffs(root, run, ref_root, ref["norm=whitening"][0], key)) <= ROUNDING
    # The drift statistics of the global batch, logged once per instrumented step. (Not
    # compared: timings, and lag_steps, a ratio that is ill-conditioned where nothing drifts.)
    ref_run = ref["norm=whitening"][0]
    keys = sorted(k for k in ref_run.data.metrics if k.startswith("drift/"))
    assert len(keys) > 10 and keys == sorted(k for k in run.data.metrics if k.startswith("drift/"))
    for key in keys:
        if key.endswith(("seconds", "overhead_frac")) or "lag_steps" in key:
            continue
        got, want = history(root, run.info.run_id, key), history(ref_root, ref_run.info.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in want], key
        for (_, a), (_, b) in zip(got, want):
            assert abs(a - b) <= 2e-3 * (abs(b) + 1e-3), (key, got, want)
    # norm=bn_warmup: both ranks switch at the same step, logged once, as one process does.
    run, job_dir = jobs["norm=bn_warmup"]
    r0, r1 = _replicas(job_dir)
    assert r0["norm"]["switched_at_step"] == r1["norm"]["switched_at_step"] == 16
    assert history(root, run.info.run_id, "norm/switch_step") == [(16, 16.0)]
    ref_run = ref["norm=bn_warmup"][0]
    assert history(ref_root, ref_run.info.run_id, "norm/switch_step") == [(16, 16.0)]
    # Its BN phase normalizes per rank (half batches): close to one process, not equal.
    assert _diffs(root, run, ref_root, ref_run, "val/loss")[-1] < 0.05
