"""``callbacks=drift`` logs through the run's one metric path: a tracking server that goes away
for the rest of the training and comes back loses no drift metric and no drift artifact, and a
run killed (SIGKILL) and resumed logs every drift step exactly once, with the values of an
uninterrupted run. Both are compared with a reference run of the same config and seed."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import (
    all_runs,
    assert_ok,
    cli_env,
    free_port,
    history,
    run_cli,
    start_server,
    stop_server,
)

# 1024 / 64 = 16 steps per epoch, 2 epochs; mid-epoch checkpoints at 5, 10, 15, 20, ...
RUN = [
    "callbacks=drift", "norm=bn", "data.num_train=1024", "data.num_val=128",
    "data.batch_size=64", "trainer.max_epochs=2", "trainer.log_every_n_steps=2",
    "trainer.enable_progress_bar=false", "callbacks.last.every_n_train_steps=5",
]  # fmt: skip
FIGURES = {"drift_heatmap", "lag_heatmap", "lag_curves", "dead_units"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, migrated_db: Path) -> dict:
    """The uninterrupted run, straight into SQLite: every drift metric's history."""
    root = tmp_path_factory.mktemp("reference")
    shutil.copy(migrated_db, root / "mlflow.db")
    assert_ok(run_cli(root, *RUN, tiny=False))
    (run,) = all_runs(root)
    hist = {
        k: history(root, run.info.run_id, k) for k in run.data.metrics if k.startswith("drift/")
    }
    assert len(hist) > 50 and "drift/features.1/lag_mean_z_probe" in hist
    return hist


def assert_same_drift_histories(root: Path, run_id: str, reference: dict) -> None:
    got_keys = {k for k in all_metric_keys(root, run_id) if k.startswith("drift/")}
    assert got_keys == set(reference)
    for key, ref in reference.items():
        got = history(root, run_id, key)
        steps = [s for s, _ in got]
        assert steps == sorted(set(steps)), f"{key}: steps repeat or go back: {steps}"
        assert steps == [s for s, _ in ref], f"{key}: steps differ"
        assert [v for _, v in got] == pytest.approx([v for _, v in ref], rel=1e-6, abs=1e-9), key


def all_metric_keys(root: Path, run_id: str) -> set[str]:
    return set(MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(run_id).data.metrics)


# -- a tracking server that goes away for the rest of the training -------------------------------
def _wait_for(cond, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
def test_drift_metrics_and_artifacts_outlive_a_tracking_server_outage(
    tmp_path, migrated_db, reference
):
    shutil.copy(migrated_db, tmp_path / "mlflow.db")  # the server's store, read back directly
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    train = None
    out = tmp_path / "train.txt"
    try:
        env = cli_env(
            MLFLOW_TRACKING_URI=uri,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",  # no client-side retries: ours must do it
            MLFLOW_HTTP_REQUEST_TIMEOUT="5",
        )
        train = subprocess.Popen(
            [sys.executable, "-m", "rescalelab.train", *RUN, f"paths.root={tmp_path}",
             f"hydra.run.dir={tmp_path}/run"],
            stdout=out.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )  # fmt: skip

        # The server goes away once the first step's metrics are in, and comes back only when
        # the training is over: every later drift metric and the end-of-fit artifacts meet it.
        def first_metrics() -> bool:
            runs = all_runs(tmp_path)
            return bool(runs) and bool(history(tmp_path, runs[0].info.run_id, "train/loss"))

        _wait_for(first_metrics, train)
        stop_server(server)
        # Training is over once the drift outputs are written locally (on_fit_end, before
        # their upload, which retries for 120 s); the console no longer shows Lightning's
        # "`Trainer.fit` stopped" line, and waiting for it waited for the process to exit.
        _wait_for(lambda: (tmp_path / "run" / "drift" / "summary.parquet").exists(), train)
        assert train.poll() is None, "the run ended before the server came back"
        time.sleep(3)
        server = start_server(tmp_path, port)
        assert train.wait(timeout=600) == 0, out.read_text()[-3000:]
        (run,) = all_runs(tmp_path)
        rid = run.info.run_id
        figures = {
            Path(a.path).stem for a in MlflowClient(uri).list_artifacts(rid, "drift/figures")
        }
    finally:
        if train is not None and train.poll() is None:
            train.kill()
        stop_server(server)
    text = out.read_text()
    assert "metrics not delivered" in text  # the outage did meet the run
    assert run.info.status == "FINISHED", text[-3000:]
    assert int(run.data.tags["rescalelab.metric_delivery_failures"]) >= 1
    assert "rescalelab.undelivered_metrics" not in run.data.tags
    assert_same_drift_histories(tmp_path, rid, reference)
    assert figures == FIGURES  # uploaded once the server was back
    assert (tmp_path / "run" / "drift" / "summary.parquet").exists()  # and kept locally


@pytest.mark.slow
def test_drift_metrics_after_sigkill_and_resume_are_logged_once(root, reference):
    run_dir = root / "run"
    log = root / "killed.txt"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rescalelab.train", *RUN, f"paths.root={root}",
             f"hydra.run.dir={run_dir}"],
            stdout=f, stderr=subprocess.STDOUT, env=cli_env(), cwd=root,
        )  # fmt: skip
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        _wait_for(ckpt.exists, proc)  # the first mid-epoch checkpoint: kill right after it
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"it ended before the kill:\n{log.read_text()}"
    (killed,) = all_runs(root)
    logged = history(root, killed.info.run_id, "drift/features.0/mean_z")
    # killed mid-run, with the drift steps before the checkpoint already in the store
    assert 0 < len(logged) < len(reference["drift/features.0/mean_z"])

    assert_ok(run_cli(root, "resume=true", f"hydra.run.dir={run_dir}", tiny=False))
    (run,) = all_runs(root)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert_same_drift_histories(root, run.info.run_id, reference)
    # the summary table continues the checkpoint's record: each (step, layer, stat) once
    import pandas as pd

    table = pd.read_parquet(run_dir / "drift" / "summary.parquet")
    assert not table.duplicated(["step", "layer", "stat"]).any()
    assert set(table.step) >= {s for s, _ in reference["drift/features.0/mean_z"]}
