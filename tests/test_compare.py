"""``rescalelab-compare``: one metric across a sweep and a single run, one table and one figure."""

from __future__ import annotations

import csv
import subprocess
import sys

from tests.helpers import all_runs, assert_ok, child_runs, cli_env, client, run_cli


def test_compare_a_sweep_and_a_run_writes_a_table_a_figure_and_logs_them(tmp_path):
    assert_ok(run_cli(tmp_path, "-m", "norm=none,bn"))
    children = child_runs(tmp_path)
    ids = {r.info.run_id for r in children}
    (parent,) = [r for r in all_runs(tmp_path) if r.info.run_id not in ids]
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    lone = children[0].info.run_id
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "rescalelab.analysis.compare", str(sweep_dir), lone,
         "--metric", "train/loss", "--out", str(out), "--log-to", parent.info.run_id,
         "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
        capture_output=True, text=True, timeout=900, env=cli_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "compare.csv").read_text().splitlines()))
    assert len(rows) == 3  # the sweep's two children, then the lone run again
    assert {r["source"] for r in rows[:2]} == {parent.info.run_name}
    c = client(tmp_path)
    for r in rows:
        history = c.get_metric_history(r["run_id"], "train/loss")
        assert float(r["final"]) == max(history, key=lambda m: m.step).value
        assert float(r["best"]) == min(m.value for m in history)
    assert (out / "compare.png").stat().st_size > 1000
    logged = {f.path for f in c.list_artifacts(parent.info.run_id, "compare")}
    assert logged == {"compare/compare.csv", "compare/compare.md", "compare/compare.png"}


def test_compare_says_which_metric_is_missing(tmp_path):
    assert_ok(run_cli(tmp_path))
    (run,) = all_runs(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "rescalelab.analysis.compare", run.info.run_id,
         "--metric", "no/such", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
        capture_output=True, text=True, timeout=900, env=cli_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "--metric=no/such" in proc.stderr
