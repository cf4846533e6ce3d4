"""The one MLflow reader of analysis: a sweep's children, a run's metric histories and
artifacts, and the target (sweep directory or run id) a command names.

Everything under :mod:`rescalelab.analysis` (the sweep report, the theory report, comparisons,
``scripts/plot_drift.py``) reads the store through these functions, so that a sweep's children
are found one way — every page of ``MlflowClient.search_runs``, not the first ``max_results`` —
and a history comes back in step order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Run

from rescalelab.tracking.run import PARENT_FILE
from rescalelab.tracking.store import default_tracking_uri

PAGE_SIZE = 1000  # runs per search_runs page; the pages are read until none is left
RUN_ID = re.compile(r"[0-9a-f]{32}")


def _job_num(run: Run) -> int:
    """The Hydra job number of a child (its run name ends ``#<n>``); unnumbered runs last."""
    m = re.search(r"#(\d+)$", run.info.run_name or "")
    return int(m.group(1)) if m else 1 << 30


def child_runs(client: MlflowClient, parent: Run | str, page_size: int = PAGE_SIZE) -> list[Run]:
    """Every run whose ``mlflow.parentRunId`` is ``parent`` (a sweep's jobs), in job order.

    ``search_runs`` returns at most ``page_size`` runs per call; the pages are followed with
    their ``page_token`` until the last, so a sweep of any size comes back whole.
    """
    if isinstance(parent, str):
        parent = client.get_run(parent)
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            max_results=page_size,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: (_job_num(r), r.info.start_time or 0))


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[Metric]:
    """Every logged value of one metric of a run, in step order (the store's order within a
    step)."""
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def metric_points(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one metric of a run, in step order."""
    return [(m.step, m.value) for m in metric_history(client, run_id, key)]


def download(client: MlflowClient, run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """Download one artifact file or folder of a run to ``dst``; returns the local path."""
    return Path(client.download_artifacts(run_id, artifact_path, str(dst)))


def resolve_target(target: str, tracking_uri: str | None) -> tuple[str, str]:
    """``(tracking_uri, parent_run_id)`` from a sweep directory or a parent run id."""
    path = Path(target)
    if path.is_dir():
        info_file = path / PARENT_FILE
        if not info_file.exists():
            raise SystemExit(f"error: {path} has no {PARENT_FILE}: is it a multirun directory?")
        info = json.loads(info_file.read_text())
        return tracking_uri or info["tracking_uri"], info["run_id"]
    if not RUN_ID.fullmatch(target):
        raise SystemExit(f"error: {target!r} is neither a sweep directory nor a run id")
    return tracking_uri or default_tracking_uri(os.getcwd()), target


__all__: Sequence[str] = [
    "child_runs",
    "download",
    "metric_history",
    "metric_points",
    "resolve_target",
]
