"""The benchmark script works end to end in --quick mode (it asserts nothing about speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from tests.helpers import cli_env


def test_quick_benchmark_prints_table_json_and_logs_to_mlflow(tmp_path):
    out = tmp_path / "bench.json"
    uri = f"sqlite:///{tmp_path}/bench.db"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "scripts" / "bench.py"), "--quick", "--json", str(out), "--tracking-uri", uri],
        capture_output=True, text=True, timeout=600, env=cli_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| row | variant | median |" in proc.stdout
    report = json.loads(out.read_text())
    rows = {r["row"].split(" (")[0]: r for r in report["rows"]}
    assert {"framework", "logging"} <= set(rows)
    for r in report["rows"]:
        assert all(v > 0 for v in r["medians"].values())
        assert r["base"] in r["medians"]
        for q25, med, q75 in r["ratios"].values():
            assert q25 <= med <= q75
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("benchmarks").experiment_id])
    assert run.data.params["machine.torch"] == report["machine"]["torch"]
    assert any(k.startswith("framework") for k in run.data.metrics)


def test_precision_and_compile_row_runs_on_cpu_when_asked(tmp_path):
    """Row 6 (bf16 autocast, torch.compile) is GPU-first, but the same code runs on a CPU."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "rescalelab.bench", "--quick", "--device", "cpu", "--rows", "gpu", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=cli_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["row"].startswith("precision and compile variants") and row["base"] == "fp32"
    assert set(row["medians"]) == {"fp32", "bf16", "compile", "compile_bf16"}
    assert all(v > 0 for v in row["medians"].values())
