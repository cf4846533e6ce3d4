"""Store robustness: many jobs into one fresh SQLite store lose nothing, and a tracking server
that goes away for a while during training does not stop it nor lose its metrics."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TINY, all_runs, cli_env, free_port, history, start_server, stop_server

# Twice as many jobs as the 2-core CI machine has cores: they start together and race to create
# the store; more of them only adds CLI start-ups (~5-8 s of imports each).
N_JOBS = 4


def _cli(root: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rescalelab.train", *overrides, f"paths.root={root}"]


@pytest.mark.slow
def test_parallel_jobs_into_one_fresh_sqlite_store_lose_nothing(tmp_path):
    assert not (tmp_path / "mlflow.db").exists()  # fresh: the first jobs race to create it
    procs = []
    for i in range(N_JOBS):
        log = (tmp_path / f"job{i}.txt").open("w")
        procs.append(
            subprocess.Popen(
                _cli(tmp_path, *TINY, f"seed={i}", f"hydra.run.dir={tmp_path}/job{i}"),
                stdout=log, stderr=subprocess.STDOUT, env=cli_env(), cwd=tmp_path,
            )
        )  # fmt: skip
    codes = [p.wait(timeout=900) for p in procs]
    logs = [(tmp_path / f"job{i}.txt").read_text()[-2000:] for i in range(N_JOBS)]
    assert codes == [0] * N_JOBS, "\n".join(logs)
    runs = all_runs(tmp_path)
    assert len(runs) == N_JOBS
    assert sorted(int(r.data.params["seed"]) for r in runs) == list(range(N_JOBS))
    for run in runs:
        assert run.info.status == "FINISHED"
        # 512 / 64 = 8 steps logged every 2 steps; one validation
        for key in ("train/loss", "train/acc", "train/lr", "epoch"):
            assert [s for s, _ in history(tmp_path, run.info.run_id, key)] == [1, 3, 5, 7], key
        for key in ("val/loss", "val/acc"):
            assert [s for s, _ in history(tmp_path, run.info.run_id, key)] == [7], key
        assert "rescalelab.undelivered_metrics" not in run.data.tags


# -- a tracking server that goes away and comes back -----------------------------------------------
@pytest.mark.slow
def test_training_outlives_a_tracking_server_outage(tmp_path, migrated_db):
    shutil.copy(migrated_db, tmp_path / "mlflow.db")  # the server's store, read back directly
    port = free_port()
    server = start_server(tmp_path, port)
    train = None
    try:
        env = cli_env(
            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}",
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",  # no client-side retries: ours must do it
            MLFLOW_HTTP_REQUEST_TIMEOUT="5",
        )
        # 2048 / 64 = 32 steps per epoch, 2 epochs, logged every 2 steps.
        overrides = ["data.num_train=2048", "data.num_val=128", "data.batch_size=64",
                     "trainer.max_epochs=2", "trainer.log_every_n_steps=2",
                     "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
        log = (tmp_path / "train.txt").open("w")
        train = subprocess.Popen(
            _cli(tmp_path, *overrides), stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=tmp_path,
        )  # fmt: skip
        # As soon as the first metrics are in, the server goes away for a while.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and train.poll() is None:
            runs = all_runs(tmp_path)
            if runs and history(tmp_path, runs[0].info.run_id, "train/loss"):
                break
            time.sleep(0.05)
        stop_server(server)
        time.sleep(3)
        server = start_server(tmp_path, port)
        assert train.wait(timeout=600) == 0, (tmp_path / "train.txt").read_text()[-3000:]
    finally:
        if train is not None and train.poll() is None:
            train.kill()
        stop_server(server)
    out = (tmp_path / "train.txt").read_text()
    assert "metrics not delivered" in out  # it noticed, and said so
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["rescalelab.metric_delivery_failures"]) >= 1
    assert "rescalelab.undelivered_metrics" not in run.data.tags
    assert [s for s, _ in history(tmp_path, run.info.run_id, "train/loss")] == list(range(1, 64, 2))
    assert [s for s, _ in history(tmp_path, run.info.run_id, "val/loss")] == [31, 63]
