"""A resumed sweep (``-m … resume=true hydra.sweep.dir=<dir>``) reattaches to its parent run."""

from __future__ import annotations

import json
import shutil

from tests.helpers import all_runs, assert_ok, child_runs, client, run_cli


def test_a_resumed_sweep_reattaches_to_its_parent_run(root):
    sweep_dir = root / "sweep"
    proc = run_cli(root, "-m", "optim.lr=0.05,0.1", f"hydra.sweep.dir={sweep_dir}")
    assert_ok(proc)
    (parent,) = [r for r in all_runs(root) if r.data.tags.get("rescalelab.sweep") == "parent"]
    assert (
        json.loads((sweep_dir / "mlflow_parent.json").read_text())["run_id"] == parent.info.run_id
    )
    # As after a kill during job 1: the parent never ended, job 1 left nothing behind.
    c = client(root)
    c.update_run(parent.info.run_id, status="RUNNING")
    job1 = next(r for r in child_runs(root) if r.data.params["optim.lr"] == "0.1")
    c.delete_run(job1.info.run_id)
    shutil.rmtree(sweep_dir / "1")

    proc = run_cli(root, "-m", "optim.lr=0.05,0.1", "resume=true", f"hydra.sweep.dir={sweep_dir}")
    assert_ok(proc)
    parents = [r for r in all_runs(root) if r.data.tags.get("rescalelab.sweep") == "parent"]
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # no second parent
    (again,) = parents
    assert again.info.status == "FINISHED"
    assert again.data.tags["rescalelab.resumes"] == "1"
    children = child_runs(root)
    assert sorted(r.data.params["optim.lr"] for r in children) == ["0.05", "0.1"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert all(r.info.status == "FINISHED" for r in children)
    job0 = next(r for r in children if r.data.params["optim.lr"] == "0.05")
    assert job0.data.tags.get("rescalelab.resumes") is None  # finished: not trained again
