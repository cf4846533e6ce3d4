"""Faults of the tracking store: checked first (one line, exit 2), and created atomically.

The bad-store cases run through the CLI's entry point in one subprocess (as
``tests/test_bad_input.py`` does) with ``data=cifar10`` pointed at a folder that does not
exist: the store's error must come out, not the dataset's, which shows that the store is
checked before the data (and the model) are built. The SIGINT case is a real CLI process on a
fresh ``paths.root``, interrupted while it creates the SQLite store.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    TINY,
    all_runs,
    assert_ok,
    cli_env,
    client,
    free_port,
    run_cli,
    tracking_uri,
)
from tests.test_bad_input import DRIVER


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A folder nothing can be written in: a read-only tmpfs for root (who ignores file modes),
    mode 0555 for anyone else."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
            capture_output=True,
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
        yield folder
        subprocess.run(["umount", str(folder)], check=False)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_a_bad_store_is_one_line_before_the_data_is_built(tmp_path, read_only_dir):
    garbage = tmp_path / "garbage" / "mlflow.db"
    garbage.parent.mkdir()
    garbage.write_bytes(bytes(range(256)) * 16)
    folder = tmp_path / "a_folder.db"
    folder.mkdir()
    port = free_port()  # bound, then closed: nothing listens there
    cases = [
        ("foo://x", "logger.tracking_uri=foo://x is invalid: MLflow has no tracking store for "
         "the scheme 'foo'; expected one of: "),
        (f"sqlite:///{garbage}", f"{garbage} is not a SQLite database"),
        (f"sqlite:///{folder}", f"{folder} is a folder, expected a SQLite database file"),
        (f"sqlite:///{read_only_dir}/mlflow.db", f"cannot write in {read_only_dir} ("),
        (f"http://127.0.0.1:{port}", f"nothing answers at 127.0.0.1:{port} (Connection refused)"),
    ]  # fmt: skip
    absent = tmp_path / "no_cifar_here"
    argvs = [
        [*TINY[3:], "data=cifar10", f"data.root={absent}", f"logger.tracking_uri={uri}",
         f"paths.root={tmp_path}"]
        for uri, _ in cases
    ]  # fmt: skip
    # A sweep checks the store of its jobs before it opens a parent run.
    argvs.append(["-m", *TINY, "optim.lr=0.1,0.2", f"logger.tracking_uri=sqlite:///{garbage}",
                  f"paths.root={tmp_path}"])  # fmt: skip
    cases.append(("sweep", f"error: job 0 (optim.lr=0.1): logger.tracking_uri=sqlite:///{garbage}"))
    before = garbage.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(argvs)],
        capture_output=True, text=True, timeout=900, env=cli_env(), cwd=tmp_path,
    )  # fmt: skip
    assert "RESULTS" in proc.stdout, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    failures = []
    for (uri, message), result in zip(cases, results):
        lines = result["stderr"].strip().splitlines()
        problems = [
            "" if result["code"] == 2 else f"exit {result['code']}",
            "" if lines and message in lines[-1] else f"no {message!r} as the last line",
            "" if sum(line.startswith("error:") for line in lines) == 1 else "not one line",
            "Traceback" if "Traceback" in result["stderr"] else "",
        ]
        if any(problems):
            failures.append(f"{uri}: {[p for p in problems if p]}\n{result['stderr'][-800:]}")
    assert not failures, "\n".join(failures)
    assert garbage.read_bytes() == before  # left as it was
    assert list(read_only_dir.iterdir()) == []
    assert not (tmp_path / "mlflow.db").exists()  # and no store was made elsewhere


def _integrity(db: Path) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("PRAGMA integrity_check").fetchone()[0]


def test_sigint_during_the_first_creation_of_the_store_leaves_it_absent_or_complete(tmp_path):
    """Ctrl-C while alembic migrates a fresh store: no half-made store that fails forever
    (``table … already exists``); the next run works."""
    root = tmp_path
    proc = subprocess.Popen(
        [sys.executable, "-m", "rescalelab.train", *TINY, f"paths.root={root}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=root,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    # The store's file appears (the database itself, or its temporary twin) when the
    # migration starts; it takes seconds, so the signal lands in the middle of it.
    while not ((root / "mlflow.db").exists() or list(root.glob(".mlflow.db.creating-*"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the store was never created"
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0, err[-2000:]
    assert not list(root.glob(".mlflow.db.creating-*"))  # no temporary file left behind
    db = root / "mlflow.db"
    if db.exists():  # the signal came after the rename: the store is complete
        assert _integrity(db) == "ok"
        client(root).search_experiments()
    again = run_cli(root)
    assert_ok(again)
    runs = all_runs(root)
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert _integrity(db) == "ok"
    assert tracking_uri(root).endswith("mlflow.db")
