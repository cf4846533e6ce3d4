"""The MLflow tracking store: created once, safely, before any job writes to it.

A fresh SQLite store is migrated by alembic on first use; several processes doing that at once
crash ("duplicate column name", "Online migration expected to match one row"). Every entry
point therefore goes through :func:`ensure_experiment`, which serializes creation of the store
and of the experiment behind a file lock next to the database.

Creation is atomic: alembic migrates a temporary file beside the database, which is renamed
into place (``os.replace``) only once it is complete. A Ctrl-C (or a kill) during the first
creation leaves no database at all, never a half-migrated one that fails forever with
``table … already exists``.

:func:`check_store` runs first of all, before anything is built: an unknown URI scheme, a
store folder that cannot be written, a file that is not a SQLite database, a path that is a
folder, or a tracking server that does not answer become one line (:class:`ConfigError`)
within seconds, instead of a traceback after the data and the model are built.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from filelock import FileLock
from mlflow import MlflowClient

from rescalelab.errors import ConfigError

SQLITE_PREFIX = "sqlite:///"
SQLITE_MAGIC = b"SQLite format 3\x00"
CREATING = ".creating-"  # the temporary database of an atomic creation: .<name>.creating-<id>
# Seconds a tracking server gets to accept a TCP connection (check_store).
PROBE_TIMEOUT = 5.0
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


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


def _create_sqlite(db: Path) -> None:
    """Migrate a new SQLite store into a temporary file beside ``db``, then rename it into place.

    Called under :func:`store_lock`. An interrupt or a failure removes the temporary file, so
    ``db`` is either absent or complete. Temporary files of creations killed outright (SIGKILL,
    power loss) are removed here too: only a holder of the lock can be creating one.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    for stale in db.parent.glob(f".{db.name}{CREATING}*"):
        stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}{CREATING}{uuid.uuid4().hex}")
    try:
        store = SqlAlchemyStore(f"{SQLITE_PREFIX}{tmp}", (db.parent / "mlartifacts").as_uri())
        store.engine.dispose()  # close the file before it is renamed (the URI is never reused)
        os.replace(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + "-journal").unlink(missing_ok=True)


def _ensure_sqlite(tracking_uri: str) -> None:
    db = sqlite_path(tracking_uri)
    if db is not None and (not db.exists() or db.stat().st_size == 0):
        _create_sqlite(db)


def ensure_store(tracking_uri: str) -> None:
    """Create and migrate the store (SQLite: the database file) without creating an experiment."""
    with store_lock(tracking_uri):
        _ensure_sqlite(tracking_uri)
        MlflowClient(tracking_uri).search_experiments(max_results=1)


def ensure_experiment(tracking_uri: str, experiment_name: str) -> str:
    """Create (if needed) the store and the experiment; return the experiment id."""
    with store_lock(tracking_uri):
        _ensure_sqlite(tracking_uri)
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


def check_store(tracking_uri: str) -> None:
    """Raise a one-line :class:`ConfigError` unless the store of ``tracking_uri`` can be used.

    ``sqlite:///<file>``: the file is absent (it will be created) or a SQLite database that can
    be opened for writing, and its folder takes new files (SQLite writes its journal there).
    A URI naming a host (``http(s)://``, ``postgresql://`` …): the host accepts a TCP connection
    within :data:`PROBE_TIMEOUT` seconds. Any other URI: MLflow must know its scheme.
    """
    if "://" not in tracking_uri and not tracking_uri.startswith(("databricks", "file:")):
        return  # not a URI at all: validate.RULES says so, with the expected forms
    key = f"logger.tracking_uri={tracking_uri}"
    db = sqlite_path(tracking_uri)
    if db is not None:
        _check_sqlite(key, db)
        return
    parsed = urlparse(tracking_uri)
    scheme = parsed.scheme.split("+", 1)[0]
    if parsed.hostname and scheme in DEFAULT_PORTS:
        _probe(key, parsed.hostname, parsed.port or DEFAULT_PORTS[scheme])
        return
    try:
        MlflowClient(tracking_uri)
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for unknown schemes
        schemes = re.search(r"Supported URI schemes are: \[([^\]]*)\]", str(e))
        if schemes:
            known = ", ".join(s.strip("' ") for s in schemes.group(1).split(",") if s.strip("' "))
            raise ConfigError(
                f"{key} is invalid: MLflow has no tracking store for the scheme "
                f"{parsed.scheme!r}; expected one of: {known}"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key} is invalid: {first}") from None


def _check_sqlite(key: str, db: Path) -> None:
    if db.is_dir():
        raise ConfigError(f"{key} is invalid: {db} is a folder, expected a SQLite database file")
    folder = db.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Proof that the folder takes new files (os.access says yes to root on a read-only
        # file system): what SQLite needs for its journal, and a new store for its file.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{db.name}.probe-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"{key} is invalid: cannot write in {folder} ({e.strerror or e}): expected a "
            "writable folder for the SQLite store"
        ) from None
    if not db.exists():
        return
    try:
        with db.open("r+b") as f:
            header = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise ConfigError(
            f"{key} is invalid: cannot open {db} for writing ({e.strerror or e})"
        ) from None
    if header and header != SQLITE_MAGIC:
        raise ConfigError(
            f"{key} is invalid: {db} is not a SQLite database (it starts with {header[:8]!r}); "
            "expected an MLflow SQLite store, or a new file name"
        )


def _probe(key: str, host: str, port: int) -> None:
    """A TCP connection to the server, so that an address where nothing listens fails in
    seconds (MLflow's client would retry for minutes: MLFLOW_HTTP_REQUEST_MAX_RETRIES)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ConfigError(
            f"{key} is invalid: nothing answers at {host}:{port} ({reason}); expected a "
            "running tracking server (start one, or use the embedded sqlite:/// store)"
        ) from None
