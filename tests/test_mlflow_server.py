"""The UI's view of a sweep: a real ``mlflow server`` on loopback, read through its REST API.

The MLflow UI is a client of these same endpoints (``runs/search``, ``artifacts/list``,
``get-artifact``), so what they return is what a user browsing the sweep sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import all_runs, assert_ok, cli_env, free_port, run_cli, tracking_uri


def _get(base: str, endpoint: str, **query: str) -> bytes:
    url = f"{base}{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_mlflow_server_shows_the_parent_its_children_and_the_report(root):
    assert_ok(run_cli(root, "-m", "norm=none,bn", "trainer.max_epochs=2"))
    (parent,) = [r for r in all_runs(root) if r.data.tags.get("rescalelab.sweep") == "parent"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", tracking_uri(root),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=cli_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # no job-runner processes
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if _get(base, "/health") == b"OK":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start in 180 s"
            time.sleep(0.5)

        exp_id = parent.info.experiment_id
        found = _post(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp_id], "filter": "tags.`rescalelab.sweep` = 'parent'",
        })["runs"]  # fmt: skip
        assert [r["info"]["run_id"] for r in found] == [parent.info.run_id]
        assert found[0]["info"]["status"] == "FINISHED"
        children = _post(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp_id],
            "filter": f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        })["runs"]  # fmt: skip
        assert sorted(r["info"]["run_name"] for r in children) == ["norm=bn #1", "norm=none #0"]
        for child in children:
            metrics = {m["key"] for m in child["data"]["metrics"]}
            assert {"train/loss", "val/loss", "val/acc"} <= metrics

        listed = json.loads(_get(
            base, "/api/2.0/mlflow/artifacts/list", run_id=parent.info.run_id, path="report"
        ))  # fmt: skip
        files = {f["path"]: f for f in listed["files"]}
        assert {"report/children.csv", "report/report.html", "report/training_curves.png"} <= set(
            files
        )
        png = _get(
            base, "/get-artifact", path="report/training_curves.png", run_uuid=parent.info.run_id
        )
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) == int(
            files["report/training_curves.png"]["file_size"]
        )
        table = _get(base, "/get-artifact", path="report/children.csv", run_uuid=parent.info.run_id)
        lines = table.decode().splitlines()
        assert len(lines) == 3 and lines[0].startswith("run,norm,method,status")
        assert b"<html" in _get(base, "/").lower()  # the UI itself is served
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group (new session)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # anything of the group still there
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        log.close()
