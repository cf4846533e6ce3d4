"""Helpers for the tests: the config composed in-process, the real CLI in a subprocess, reads
through MlflowClient, a real tracking server on loopback."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from hydra import compose, initialize_config_module
from mlflow import MlflowClient
from omegaconf import DictConfig

from rescalelab.validate import validate

# Tiny settings that keep one CLI run to a few seconds on a 2-core CPU.
TINY = [
    "data.num_train=512",
    "data.num_val=128",
    "data.batch_size=64",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=2",
    "trainer.enable_progress_bar=false",
]


# paths.root and paths.output_dir of a config composed in-process (the CLI sets both; composing
# and validating write nothing there).
COMPOSE_PATHS = [
    "paths.root=/tmp/rescalelab-compose",
    "paths.output_dir=/tmp/rescalelab-compose/out",
]


def compose_train(*overrides: str, hydra: bool = False, check: bool = False) -> DictConfig:
    """``train.yaml`` composed with ``overrides`` as ``rescalelab-train`` composes it, in-process.

    ``hydra``: keep the ``hydra`` node (launcher, sweeper, sweep params); ``check``: also run
    :func:`rescalelab.validate.validate` on it (ConfigError on bad input, as the CLI would).
    """
    with initialize_config_module("rescalelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*COMPOSE_PATHS, *overrides], return_hydra_config=hydra)
    if check:
        validate(cfg)
    return cfg


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{root}/mlflow.db"


def client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri(root))


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.update(extra)
    return env


def run_cli(
    root: Path, *overrides: str, tiny: bool = True, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m rescalelab.train <overrides> paths.root=<root>`` in a subprocess."""
    args = [*(TINY if tiny else []), *overrides, f"paths.root={root}"]
    multirun = [a for a in args if a in ("-m", "--multirun")]
    args = multirun + [a for a in args if a not in multirun]
    return subprocess.run(
        [sys.executable, "-m", "rescalelab.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
        cwd=root,
    )


def all_runs(root: Path, experiment: str = "rescalelab") -> list:
    c = client(root)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], max_results=1000)


def child_runs(root: Path, experiment: str = "rescalelab") -> list:
    return [
        r for r in all_runs(root, experiment) if r.data.tags.get("rescalelab.sweep") != "parent"
    ]


def history(root: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(root).get_metric_history(run_id, key)]


def sweep_parent(root: Path, experiment: str = "rescalelab"):
    """The one sweep parent run of ``experiment`` in ``root``'s store."""
    (parent,) = [
        r for r in all_runs(root, experiment) if r.data.tags.get("rescalelab.sweep") == "parent"
    ]
    return parent


def report_rows(root: Path, run_id: str, name: str = "children.csv") -> list[dict[str, str]]:
    """The rows of the sweep report's ``report/<name>`` artifact of run ``run_id``."""
    local = client(root).download_artifacts(run_id, f"report/{name}", str(root))
    with open(local) as f:
        return list(csv.DictReader(f))


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


# -- a real tracking server on loopback ------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port`` over ``root``'s SQLite store, once healthy."""
    env = cli_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "mlartifacts")],
        stdout=(root / "server.txt").open("a"), stderr=subprocess.STDOUT, env=env, cwd=root,
        start_new_session=True,  # its own process group: stopped as a whole
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.25)
        assert proc.poll() is None, (root / "server.txt").read_text()[-3000:]
    raise AssertionError("the tracking server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (SIGKILL after 30 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
