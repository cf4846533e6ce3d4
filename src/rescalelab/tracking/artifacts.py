"""Small MLflow helpers for instruments: batched (asynchronous) metrics, files, tables, figures.

Instruments never import mlflow; they hand their Lightning logger to these functions. With an
``MLFlowLogger`` (the run created by :class:`~rescalelab.tracking.TrackedRun`), metrics go out
through :class:`MetricSink` as batched ``log_batch`` calls (buffered, asynchronous or
synchronous). Any other logger gets ``logger.log_metrics(dict, step)``; no logger means nothing
is written.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.utils.validation import MAX_METRICS_PER_BATCH
from pytorch_lightning.loggers import MLFlowLogger

_BAD_KEY_CHARS = re.compile(r"[^a-zA-Z0-9_/. \-]")


def metric_key(key: str) -> str:
    """``key`` with characters MLflow rejects replaced by ``_`` (as Lightning's logger does)."""
    return _BAD_KEY_CHARS.sub("_", key)


def mlflow_target(logger: Any) -> tuple[MlflowClient, str] | None:
    """``(client, run_id)`` of an MLflow logger, else ``None``."""
    if isinstance(logger, MLFlowLogger) and logger.run_id is not None:
        return logger.experiment, logger.run_id
    return None


class MetricSink:
    """Writes ``{key: value}`` at a step to the run, in one of three modes.

    * ``buffered`` (default): values are kept and written synchronously, in ``log_batch`` calls
      of up to 1000 metrics, once ``max_values`` are waiting or ``max_seconds`` have passed, and
      on :meth:`flush`. Each value costs ~0.1 ms of SQLite work however it is sent (more on a
      busy disk); batching pays the per-call cost once per 1000 values, writes between training
      steps rarely, and, unlike the asynchronous mode, runs no Python on a second thread that
      competes with the training loop for the GIL.
    * ``async``: one ``log_batch(synchronous=False)`` per call, written by MLflow's logging thread.
    * ``sync``: one blocking ``log_batch`` per call.

    :meth:`wait` flushes and blocks until every asynchronous write has reached the store (call it
    before the run is ended). Without MLflow, ``logger.log_metrics(dict, step)`` is used.
    """

    MODES = ("buffered", "async", "sync")

    def __init__(
        self,
        logger: Any,
        mode: str = "buffered",
        max_values: int = MAX_METRICS_PER_BATCH,
        max_seconds: float = 30.0,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode={mode!r}: expected one of {self.MODES}")
        self.logger, self.mode = logger, mode
        self.target = mlflow_target(logger)
        self.max_values, self.max_seconds = max_values, max_seconds
        self._buffer: list[tuple[int, dict[str, float]]] = []
        self._buffered = 0
        self._last_flush = time.monotonic()
        self._pending: list[Any] = []

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not metrics or self.logger is None:
            return
        if self.mode != "buffered":
            self._write([(int(step), dict(metrics))], synchronous=self.mode == "sync")
            return
        self._buffer.append((int(step), dict(metrics)))
        self._buffered += len(metrics)
        if (
            self._buffered >= self.max_values
            or time.monotonic() - self._last_flush >= self.max_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Write every buffered value now (synchronously)."""
        self._last_flush = time.monotonic()
        if self._buffer:
            buffer, self._buffer, self._buffered = self._buffer, [], 0
            self._write(buffer, synchronous=True)

    def _write(self, items: list[tuple[int, dict[str, float]]], synchronous: bool) -> None:
        if self.target is None:
            for step, metrics in items:
                self.logger.log_metrics(metrics, step=step)
            return
        client, run_id = self.target
        ts = int(time.time() * 1000)
        rows = [
            Metric(metric_key(k), float(v), ts, step) for step, m in items for k, v in m.items()
        ]
        for i in range(0, len(rows), MAX_METRICS_PER_BATCH):
            op = client.log_batch(
                run_id, metrics=rows[i : i + MAX_METRICS_PER_BATCH], synchronous=synchronous
            )
            if op is not None:
                self._pending.append(op)

    def wait(self) -> None:
        self.flush()
        pending, self._pending = self._pending, []
        for op in pending:
            op.wait()


def log_file(logger: Any, path: str | Path, artifact_dir: str) -> bool:
    """Copy a local file into the run's artifacts under ``artifact_dir``; False without MLflow."""
    target = mlflow_target(logger)
    if target is None:
        return False
    client, run_id = target
    client.log_artifact(run_id, str(path), artifact_dir)
    return True


def log_npz(logger: Any, arrays: Mapping[str, Any], artifact_file: str) -> bool:
    """``numpy.savez(arrays)`` (uncompressed: fast) as the artifact ``artifact_file``."""
    import numpy as np

    if mlflow_target(logger) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        np.savez(path, **arrays)
        return log_file(logger, path, str(Path(artifact_file).parent))


def log_npz_files(logger: Any, files: Mapping[str, Mapping[str, Any]], artifact_dir: str) -> bool:
    """Several npz files (``{file name: arrays}``) into ``artifact_dir`` with one upload call."""
    import numpy as np

    target = mlflow_target(logger)
    if target is None or not files:
        return False
    client, run_id = target
    with tempfile.TemporaryDirectory() as tmp:
        for name, arrays in files.items():
            np.savez(Path(tmp) / name, **arrays)
        client.log_artifacts(run_id, tmp, artifact_dir)
    return True


def log_table(logger: Any, frame: Any, artifact_file: str) -> bool:
    """A pandas DataFrame as a parquet artifact."""
    if mlflow_target(logger) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        frame.to_parquet(path, index=False)
        return log_file(logger, path, str(Path(artifact_file).parent))


def log_json(logger: Any, obj: Any, artifact_file: str) -> bool:
    """A JSON-serialisable object as an artifact."""
    if mlflow_target(logger) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(json.dumps(obj, indent=1, default=float))
        return log_file(logger, path, str(Path(artifact_file).parent))


def log_figure(logger: Any, figure: Any, artifact_file: str) -> bool:
    """A matplotlib figure as an image artifact (the format follows the file suffix)."""
    target = mlflow_target(logger)
    if target is None:
        return False
    client, run_id = target
    client.log_figure(run_id, figure, artifact_file)
    return True


def download(tracking_uri: str, run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """Download one artifact file or folder of a run to ``dst``; returns the local path."""
    local = MlflowClient(tracking_uri).download_artifacts(run_id, artifact_path, str(dst))
    return Path(local)


def list_artifacts(tracking_uri: str, run_id: str, path: str) -> list[str]:
    """Artifact paths directly under ``path`` of a run."""
    return [a.path for a in MlflowClient(tracking_uri).list_artifacts(run_id, path)]


def run_params(tracking_uri: str, run_id: str) -> dict[str, str]:
    """The params of a run."""
    return dict(MlflowClient(tracking_uri).get_run(run_id).data.params)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one metric of a run, in step order."""
    hist = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


def child_run_ids(tracking_uri: str, parent_run_id: str) -> list[str]:
    """Ids of the runs whose ``mlflow.parentRunId`` is ``parent_run_id`` (a sweep's jobs)."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=10000,
    )
    return [r.info.run_id for r in runs]


def log_figure_to_run(tracking_uri: str, run_id: str, figure: Any, artifact_file: str) -> None:
    """A matplotlib figure as an image artifact of an existing run (scripts, after the fact)."""
    MlflowClient(tracking_uri).log_figure(run_id, figure, artifact_file)
