"""The training CLI end to end: a real subprocess, a real SQLite store, read back with MlflowClient."""

from __future__ import annotations

import pytest

from tests.helpers import all_runs, assert_ok, child_runs, client, history, run_cli


def test_single_run_is_recorded_with_params_metrics_and_config(root):
    proc = run_cli(root, "optim.lr=0.07", "norm=bn")
    assert_ok(proc)
    runs = all_runs(root)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name.endswith(
        "trainer.max_epochs=1 trainer.log_every_n_steps=2 optim.lr=0.07 norm=bn"
    )
    assert "paths.root" not in run.info.run_name
    p = run.data.params
    assert p["optim.lr"] == "0.07"
    assert p["norm._target_"] == "rescalelab.norm.BatchNorm"
    assert p["data.num_train"] == "512"
    assert p["trainer.max_epochs"] == "1"
    for key in ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc"):
        assert key in run.data.metrics, key
    assert run.data.metrics["train/lr"] == pytest.approx(0.07)
    # 512 / 64 = 8 steps, logged every 2 steps
    assert [s for s, _ in history(root, run.info.run_id, "train/loss")] == [1, 3, 5, 7]
    tags = run.data.tags
    assert tags["rescalelab.overrides"].endswith(f"optim.lr=0.07 norm=bn paths.root={root}")
    assert tags["rescalelab.output_dir"].startswith(str(root / "outputs"))
    assert "host" in tags
    assert run.info.artifact_uri.startswith((root / "mlartifacts").as_uri())
    artifacts = {a.path for a in client(root).list_artifacts(run.info.run_id, "config")}
    assert "config/config_resolved.yaml" in artifacts
    hydra_files = {a.path for a in client(root).list_artifacts(run.info.run_id, "config/hydra")}
    assert {"config/hydra/overrides.yaml", "config/hydra/config.yaml"} <= hydra_files
    # The CLI tells where to look.
    out = proc.stdout + proc.stderr
    assert run.info.run_id in out
    assert f"mlflow ui --backend-store-uri sqlite:///{root}/mlflow.db" in out


def test_multirun_creates_a_parent_and_one_child_per_job(root):
    proc = run_cli(root, "-m", "optim.lr=0.01,0.02,0.05")
    assert_ok(proc)
    runs = all_runs(root)
    parents = [r for r in runs if r.data.tags.get("rescalelab.sweep") == "parent"]
    children = child_runs(root)
    assert len(parents) == 1 and len(children) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(r.info.run_name for r in children) == [
        "optim.lr=0.01 #0", "optim.lr=0.02 #1", "optim.lr=0.05 #2",
    ]  # fmt: skip
    assert sorted(float(r.data.params["optim.lr"]) for r in children) == [0.01, 0.02, 0.05]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_same_seed_same_metrics_other_seed_differs(root):
    ids = []
    for seed in (3, 3, 4):
        assert_ok(run_cli(root, f"seed={seed}", "norm=bn"))
        ids.append(max(all_runs(root), key=lambda r: r.info.start_time).info.run_id)
    keys = ("train/loss", "train/acc", "val/loss", "val/acc")
    first, second, other = ([history(root, i, k) for k in keys] for i in ids)
    assert first == second
    assert first != other


def test_small_cnn_learns_the_synthetic_task(root):
    proc = run_cli(
        root, "data.num_train=3000", "data.num_val=500", "data.batch_size=64",
        "trainer.max_epochs=4", "trainer.log_every_n_steps=5", "optim.lr=0.05",
        "trainer.enable_progress_bar=false", tiny=False,
    )  # fmt: skip
    assert_ok(proc)
    (run,) = all_runs(root)
    losses = [v for _, v in history(root, run.info.run_id, "train/loss")]
    assert losses[0] > 2.0  # ~ log(10) at the start
    assert run.data.metrics["train/loss"] < 0.5 * losses[0]
    assert run.data.metrics["val/acc"] > 0.6  # chance is 0.1
