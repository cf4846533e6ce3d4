"""scripts/gpu_check.sh in its CPU dry-run mode: the same four steps, one table, its exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cli_env

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_check.sh"


def _check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=900,
        env=cli_env(PYTHON=sys.executable, TMPDIR=str(tmp_path), **env),
    )  # fmt: skip


def _table(stdout: str) -> dict[str, str]:
    """Step name -> status, from the table's step lines."""
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ")]
    return {r[0].strip(): r[1].strip() for r in rows if r[0].strip() not in ("", "step")}


@pytest.mark.slow
def test_dry_run_runs_every_step_and_prints_one_table(tmp_path):
    proc = _check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "| step | status | s | result |" in proc.stdout
    assert _table(proc.stdout) == {
        "norm": "ok", "train_gpu": "ok", "train_ddp": "ok", "framework": "ok",
    }  # fmt: skip
    # The benchmark steps list their rows: norm none/bn/whitening, framework with Lightning alone.
    assert "norm (small_cnn, batch 128, 32px, cpu fp32): bn/none" in proc.stdout
    assert "whitening/bn = " in proc.stdout
    assert "lightning alone/bare = " in proc.stdout
    assert not list(tmp_path.glob("gpu_check.*"))  # its work folder is removed


def test_a_failing_step_fails_the_check_and_names_the_error(tmp_path):
    proc = _check(
        tmp_path,
        RESCALELAB_GPU_CHECK_STEPS="train_gpu",
        RESCALELAB_GPU_CHECK_TRAIN_ARGS="data.batch_size=0",
    )
    assert proc.returncode != 0
    assert _table(proc.stdout) == {"train_gpu": "FAIL"}
    assert "rc 2: error: data.batch_size=0 is invalid" in proc.stdout
