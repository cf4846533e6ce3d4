"""Faults during a run: a full disk, and a single run that diverges.

A full disk is modelled honestly: the output directory is a small tmpfs (ENOSPC on every
write past its size), while the store stays on a healthy disk so that it can be checked
intact afterwards. Three sizes hit three moments: the run's own files just after the run is
created (``mlflow_run_id``), the first checkpoint, and a later checkpoint. All cases run
through the CLI's entry point in one subprocess (see ``tests/test_bad_input.py``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY, all_runs, cli_env
from tests.test_bad_input import DRIVER

# tmpfs sizes (pages of 4 KiB): .hydra/ takes 4 pages (hydra.yaml is 2), a small_cnn
# checkpoint ~141.
SIZES = ["16k", "40k", "1200k"]


@pytest.fixture
def small_disks(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disks = []
    for size in SIZES:
        d = tmp_path / f"disk_{size}"
        d.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
        disks.append(d)
    yield disks
    for d in disks:
        subprocess.run(["umount", str(d)], check=False)


def test_a_full_disk_ends_the_run_failed_with_its_reason_and_the_store_intact(
    tmp_path, migrated_db, small_disks
):
    roots, argvs = [], []
    for disk in small_disks:
        root = tmp_path / f"root_{disk.name}"
        root.mkdir()
        (root / "mlflow.db").write_bytes(migrated_db.read_bytes())
        roots.append(root)
        argvs.append([
            *TINY[:3], "trainer.max_epochs=2", *TINY[4:], "callbacks.last.every_n_train_steps=4",
            f"paths.root={root}", f"hydra.run.dir={disk}/out",
        ])  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(argvs)],
        capture_output=True, text=True, timeout=1200, env=cli_env(), cwd=tmp_path,
    )  # fmt: skip
    assert "RESULTS" in proc.stdout, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    for disk, root, result in zip(small_disks, roots, results):
        assert result["code"] not in (0, None), f"{disk.name}: {result['stderr'][-1500:]}"
        (run,) = all_runs(root)
        where = f"{disk.name}: {run.data.tags}\n{result['stderr'][-1500:]}"
        assert run.info.status == "FAILED", where
        assert run.data.tags["rescalelab.status"] == "failed", where
        assert "No space left on device" in run.data.tags["rescalelab.failed_reason"], where
        with sqlite3.connect(root / "mlflow.db") as con:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_single_run_that_diverges_exits_1(root):
    """A lone run that diverges exits 1 (its run FAILED, diverged); in a sweep the job returns
    and the sweep exits 0 (``tests/test_divergence.py``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "rescalelab.train", *TINY, "optim.lr=100", f"paths.root={root}"],
        capture_output=True, text=True, timeout=600, env=cli_env(), cwd=root,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "diverged" in proc.stderr
    (run,) = all_runs(root)
    assert run.info.status == "FAILED"
    assert run.data.tags["rescalelab.status"] == "diverged"
