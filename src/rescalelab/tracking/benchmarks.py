"""Benchmark reports go to the MLflow experiment ``benchmarks``, one run per invocation."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from rescalelab.tracking.store import ensure_experiment


def _name(text: str) -> str:
    """``text`` with every character MLflow refuses in a metric or tag name (``+``, ``,``, …) as ``_``."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in text)


def log_benchmark(tracking_uri: str, report: dict[str, Any]) -> str:
    """Log the machine as params, each median ratio as a metric, the report as JSON; return the run id."""
    client = MlflowClient(tracking_uri)
    run = client.create_run(
        ensure_experiment(tracking_uri, "benchmarks"), run_name="rescalelab-bench"
    )
    rid = run.info.run_id
    for k, v in report["machine"].items():
        client.log_param(rid, f"machine.{k}", v)
    client.log_param(rid, "device", report["device"])
    client.log_param(rid, "quick", report["quick"])
    for row in report["rows"]:
        key = _name(row["row"])
        for variant, (_, med, _) in row["ratios"].items():
            client.log_metric(rid, _name(f"{key}/{variant}_over_{row['base']}"), med)
        if row["holds"] is not None:
            client.set_tag(rid, f"target: {key}", "holds" if row["holds"] else "misses")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "report.json").write_text(json.dumps(report, indent=1))
        client.log_artifacts(rid, tmp)
    client.set_terminated(rid, "FINISHED")
    return rid
