"""A team MLflow tracking server (``scripts/mlflow_server.sh``) on loopback, really started.

The server gets a SQLite backend store here (a copy of the pre-migrated one); with
``RESCALELAB_TEST_POSTGRES_URI=postgresql://user:pw@host:5432/db`` set (and ``psycopg``
installed) every test runs against a PostgreSQL backend too, and skips cleanly otherwise.
Artifacts go to a directory that the server alone writes (``--serve-artifacts``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import assert_ok, cli_env, free_port, run_cli
from tests.helpers import client as local_client

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mlflow_server.sh"
POSTGRES = os.environ.get("RESCALELAB_TEST_POSTGRES_URI")
WRITERS, STEPS = 4, 40

# One writer process: its own run (params, 3 metrics per step, an artifact) and one metric key
# of its own in a run that every writer logs into at the same time.
WRITER = r"""
import sys, time
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
uri, exp_id, shared, i, n, start = sys.argv[1:7]
i, n = int(i), int(n)
c = MlflowClient(uri)
while time.time() < float(start):
    time.sleep(0.005)
run_id = c.create_run(exp_id, run_name=f"writer {i}").info.run_id
c.log_batch(run_id, params=[Param("writer", str(i))])
for step in range(n):
    now = int(time.time() * 1000)
    metrics = [Metric(f"m{j}", i * 1000 + step + j / 10, now, step) for j in range(3)]
    c.log_batch(run_id, metrics=metrics)
    c.log_metric(shared, f"writer{i}", float(step), step=step)
c.log_text(run_id, f"writer {i}", "notes/writer.txt")
c.set_terminated(run_id)
print(run_id)
"""


def _postgres_ready() -> str | None:
    """Why the PostgreSQL variant cannot run, or None when it can."""
    if not POSTGRES:
        return "RESCALELAB_TEST_POSTGRES_URI is not set"
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(POSTGRES, connect_args={"connect_timeout": 5})
        with engine.connect():
            pass
        engine.dispose()
    except ImportError as e:
        return f"no PostgreSQL driver ({e}): pip install 'psycopg[binary]'"
    except Exception as e:  # noqa: BLE001 - any failure to connect means: skip
        return f"no PostgreSQL server at RESCALELAB_TEST_POSTGRES_URI: {e}".splitlines()[0]
    return None


class Server:
    def __init__(self, uri: str, artifacts: Path, backend: str) -> None:
        self.uri, self.artifacts, self.backend = uri, artifacts, backend


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory, migrated_db) -> Iterator[Server]:
    """``bash scripts/mlflow_server.sh`` on 127.0.0.1, stopped (its process group) at the end."""
    base = tmp_path_factory.mktemp(f"server-{request.param}")
    if request.param == "postgresql":
        reason = _postgres_ready()
        if reason:
            pytest.skip(reason)
        backend = POSTGRES
    else:
        shutil.copy(migrated_db, base / "mlflow.db")
        backend = f"sqlite:///{base / 'mlflow.db'}"
    artifacts, port = base / "artifacts", free_port()
    log = (base / "server.log").open("w")
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--backend-store-uri", backend, "--artifacts-destination",
         str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, env=cli_env(), cwd=base, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited:\n{(base / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (base / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield Server(uri, artifacts, backend)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
            proc.wait(timeout=5)  # uvicorn's graceful shutdown can take longer: not needed
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _experiment(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


@pytest.mark.slow
def test_concurrent_writers_through_the_server_lose_nothing(server, tmp_path):
    client = MlflowClient(server.uri)
    exp = _experiment(client, f"writers-{tmp_path.name}")
    shared = client.create_run(exp, run_name="shared").info.run_id
    start = time.time() + 6  # all writers import mlflow first, then start together
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, server.uri, exp, shared, str(i), str(STEPS), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )  # fmt: skip
        for i in range(WRITERS)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    run_ids = [out.strip().splitlines()[-1] for out, _ in outs]
    assert len(set(run_ids)) == WRITERS
    for i, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"writer": str(i)}
        for j in range(3):
            got = [(m.step, m.value) for m in client.get_metric_history(run_id, f"m{j}")]
            assert sorted(got) == [(s, i * 1000 + s + j / 10) for s in range(STEPS)]
        (tmp_path / str(i)).mkdir()
        local = client.download_artifacts(run_id, "notes/writer.txt", str(tmp_path / str(i)))
        assert Path(local).read_text() == f"writer {i}"
    for i in range(WRITERS):
        got = sorted((m.step, m.value) for m in client.get_metric_history(shared, f"writer{i}"))
        assert got == [(s, float(s)) for s in range(STEPS)]
    # The server wrote the artifacts into its destination; the writers never saw that path.
    assert len(list(server.artifacts.rglob("writer.txt"))) == WRITERS


@pytest.mark.slow
def test_ddp_job_tracks_one_run_through_the_server(server, root):
    """``MLFLOW_TRACKING_URI=http://…`` and 2 DDP ranks: one run, metrics once per step."""
    experiment = f"ddp-{root.name}"
    proc = run_cli(
        root, "trainer=ddp_cpu", "norm=bn", f"logger.experiment_name={experiment}",
        env=cli_env(MLFLOW_TRACKING_URI=server.uri),
    )  # fmt: skip
    assert_ok(proc)
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 3, 5, 7]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [7]
    assert list(server.artifacts.rglob(f"{run.info.run_id}/artifacts/config/config_resolved.yaml"))
    assert not (root / "mlruns").exists() and not (root / "mlartifacts").exists()
    assert local_client(root).get_experiment_by_name(experiment) is None  # nothing went local
