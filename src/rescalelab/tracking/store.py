"""The MLflow tracking store: created once, safely, before any job writes to it.

A fresh SQLite store is migrated by alembic on first use; several processes doing that at once
crash ("duplicate column name", "Online migration expected to match one row"). Every entry
point therefore goes through :func:`ensure_experiment`, which serializes creation of the store
and of the experiment behind a file lock next to the database.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock
from mlflow import MlflowClient

SQLITE_PREFIX = "sqlite:///"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else ``None``."""
    if tracking_uri.startswith(SQLITE_PREFIX):
        return Path(tracking_uri[len(SQLITE_PREFIX) :])
    return None


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an inter-process lock on a SQLite store (no-op for servers)."""
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=600):
        yield


def ensure_store(tracking_uri: str) -> None:
    """Create and migrate the store (SQLite: the database file) without creating an experiment."""
    with store_lock(tracking_uri):
        MlflowClient(tracking_uri).search_experiments(max_results=1)


def ensure_experiment(tracking_uri: str, experiment_name: str) -> str:
    """Create (if needed) the store and the experiment; return the experiment id."""
    with store_lock(tracking_uri):
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        # A SQLite store keeps its artifacts beside the database file, never in ./mlruns of
        # whatever directory the first job happened to start in.
        db = sqlite_path(tracking_uri)
        location = (db.resolve().parent / "mlartifacts").as_uri() if db else None
        # The experiment type MLflow 3's UI sets itself when a user picks "model training"
        # (its GenAI/model-training switch is per browser: ui_hint's URL parameter selects it).
        return client.create_experiment(
            experiment_name, artifact_location=location,
            tags={"mlflow.experimentKind": "custom_model_development"},
        )  # fmt: skip


def default_tracking_uri(root: str | os.PathLike[str]) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else the embedded store ``sqlite:///<root>/mlflow.db``."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE_PREFIX}{Path(root).resolve()}/mlflow.db"
    )
