"""A preempted or timed-out submitit job is requeued and resumes its own MLflow run.

The signal path is SLURM's, driven on one machine: submitit's local executor runs the Hydra job
in a task process; SIGUSR2 (what SLURM sends ``signal_delay_s`` before a time limit, and on
preemption) goes to that process; the requeued task must continue the same run and end with
the metrics of an uninterrupted one. And a job SLURM itself restarts (``SLURM_RESTART_COUNT``)
with its original command resumes rather than starting over.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, all_runs, assert_ok, child_runs, cli_env, history, run_cli
from tests.probes import probe_env

RUN = ["trainer.max_epochs=2", "callbacks.last.every_n_train_steps=5"]  # 8 steps an epoch
LOCAL = [
    "hydra/launcher=submitit_local",
    "hydra.launcher._target_=hydra_plugins.rescalelab_plugins.submitit_requeue.LocalLauncher",
    "hydra.callbacks.mlflow_sweep.report=false",
]


def _histories(root: Path, run) -> dict[str, list[tuple[int, float]]]:
    return {
        k: history(root, run.info.run_id, k)
        for k in run.data.metrics
        if not k.startswith("system/")  # wall-clock samples of the machine, not of training
    }


def _task_pids(folder: Path) -> list[int]:
    """Processes running a submitit task whose job folder is under ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        args = [a.decode(errors="replace") for a in cmd]
        if "submitit.core._submit" in args and any(str(folder) in a for a in args):
            pids.append(int(proc.name))
    return pids


def _ckpt_step(path: Path) -> int | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:  # noqa: BLE001 - absent, or being renamed into place
        return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory, migrated_db) -> dict:
    root = tmp_path_factory.mktemp("reference")
    shutil.copy(migrated_db, root / "mlflow.db")
    assert_ok(run_cli(root, *RUN))
    (run,) = all_runs(root)
    return _histories(root, run)


def _assert_same(got: dict, reference: dict) -> None:
    assert got.keys() == reference.keys()
    for key, ref in reference.items():
        assert [s for s, _ in got[key]] == [s for s, _ in ref], f"{key}: steps differ"
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in ref], rel=1e-6), key


@pytest.mark.slow
def test_sigusr2_requeues_the_submitit_job_which_resumes_its_run(root, reference):
    sweep = root / "sweep"
    job_ckpt = sweep / "0" / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "rescalelab.train", "-m", *TINY, *LOCAL, *RUN,
           f"hydra.sweep.dir={sweep}", f"paths.root={root}"]  # fmt: skip
    with (root / "sweep.txt").open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cli_env(), cwd=root)
        deadline = time.monotonic() + 600
        while proc.poll() is None and not _ckpt_step(job_ckpt) and time.monotonic() < deadline:
            time.sleep(0.01)  # the first checkpoint: training is under way
        tasks = _task_pids(sweep)
        assert len(tasks) == 1, (root / "sweep.txt").read_text()[-3000:]
        os.kill(tasks[0], signal.SIGUSR2)  # SLURM's warning: time limit near, or preempted
        proc.wait(timeout=600)
    output = (root / "sweep.txt").read_text()
    assert proc.returncode == 0, output[-4000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "SIGUSR2: training stopped at step " in logs, logs[-4000:]  # at a step's end
    assert "Requeued job" in logs  # submitit requeued it

    (run,) = child_runs(root)  # the requeued job continued the run: no second one
    assert run.info.status == "FINISHED"
    assert run.data.tags["rescalelab.resumes"] == "1"
    _assert_same(_histories(root, run), reference)


@pytest.mark.slow
def test_a_job_slurm_restarts_with_its_own_command_resumes_its_run(root, reference):
    sweep = root / "sweep"
    kill = [
        "+callbacks.kill._target_=tests.probes.KillAt",
        "+callbacks.kill.dirpath=${paths.output_dir}",
        "+callbacks.kill.steps=[7]",
    ]
    report = "hydra.callbacks.mlflow_sweep.report=false"
    command = ["-m", *RUN, *kill, f"hydra.sweep.dir={sweep}", report]
    first = run_cli(root, *command, env=probe_env())
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]  # node failure
    (killed,) = child_runs(root)
    assert killed.info.status == "RUNNING"

    again = run_cli(root, *command, env=probe_env(SLURM_RESTART_COUNT="1"))
    assert_ok(again)
    assert f"requeued (SLURM_RESTART_COUNT=1): resuming run {killed.info.run_id}" in again.stderr
    (run,) = child_runs(root)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    _assert_same(_histories(root, run), reference)
