"""Helpers for the tests: the real CLI in a subprocess and reads through MlflowClient."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

# Tiny settings that keep one CLI run to a few seconds on a 2-core CPU.
TINY = [
    "data.num_train=512",
    "data.num_val=128",
    "data.batch_size=64",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=2",
    "trainer.enable_progress_bar=false",
]


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


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
