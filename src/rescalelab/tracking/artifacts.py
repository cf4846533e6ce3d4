"""Artifacts of a run, the write half: files into the run (callbacks, and scripts after the fact).
Reading a run back (its artifacts, params, metric histories, a sweep's children) is
:mod:`rescalelab.analysis.mlflow_read`'s.

Callbacks log *metrics* through ``trainer.loggers`` only (the run's resilient logger queues,
retries and de-duplicates them, ``tracking/resilient.py``). Their *files* are written locally
first (they stay there whatever the store does) and then copied into the run by :func:`upload`,
which never raises and never waits longer than ``timeout``: a store outage costs the upload,
with a warning that says where the files are, never the run.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger

UPLOAD_TIMEOUT = 120.0  # seconds an upload may take before the run goes on without it
RETRY_SECONDS = 2.0  # between attempts while the store refuses (the metric queue's period)


def mlflow_target(loggers: Any) -> tuple[MlflowClient, str] | None:
    """``(client, run_id)`` of the first MLflow logger (a logger or a list of them), else
    ``None``."""
    for logger in loggers if isinstance(loggers, Iterable) else [loggers]:
        if isinstance(logger, MLFlowLogger) and logger.run_id is not None:
            return logger.experiment, logger.run_id
    return None


def upload(
    loggers: Any,
    path: str | Path,
    artifact_path: str,
    timeout: float = UPLOAD_TIMEOUT,
    retry_seconds: float = RETRY_SECONDS,
) -> bool:
    """Copy a local file or folder into the run's artifacts under ``artifact_path``.

    The copy runs on a helper thread, retried every ``retry_seconds`` while the store refuses
    (a tracking server restarting), and is waited for at most ``timeout`` seconds. Returns True
    when it is done; False without an MLflow logger, and False with a warning on stderr when it
    could not be done in time (the files stay at ``path``).
    """
    target = mlflow_target(loggers)
    if target is None:
        return False
    client, run_id = target
    path = Path(path)
    outcome: dict[str, str] = {}
    give_up = threading.Event()

    def copy() -> None:
        while not give_up.is_set():
            try:
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), artifact_path)
                else:
                    client.log_artifact(run_id, str(path), artifact_path)
                outcome["done"] = "yes"
                return
            except Exception as e:  # noqa: BLE001 - any failure: retry, then say so and go on
                outcome["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                give_up.wait(retry_seconds)

    worker = threading.Thread(target=copy, name="rescalelab-artifacts", daemon=True)
    worker.start()
    worker.join(timeout)
    give_up.set()
    if "done" in outcome:
        return True
    why = outcome.get("error", "no answer")
    print(
        f"warning: {path} could not be copied into run {run_id} in {timeout:g} s ({why}); "
        "the files stay there",
        file=sys.stderr,
    )
    return False


def log_json(loggers: Any, obj: Any, path: str | Path, artifact_path: str) -> bool:
    """Write ``obj`` as JSON to the local file ``path``, then :func:`upload` it (nothing is
    written without an MLflow logger)."""
    if mlflow_target(loggers) is None:
        return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float))
    return upload(loggers, path, artifact_path)


def log_figure_to_run(tracking_uri: str, run_id: str, figure: Any, artifact_file: str) -> None:
    """A matplotlib figure as an image artifact of an existing run (scripts, after the fact)."""
    MlflowClient(tracking_uri).log_figure(run_id, figure, artifact_file)
