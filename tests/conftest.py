"""Shared fixtures: a real (pre-migrated) SQLite MLflow store per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store migrated once per session; tests get copies (alembic costs ~2 s)."""
    from rescalelab.tracking.store import ensure_store

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    ensure_store(f"sqlite:///{path}")  # no experiment: its artifact location is per root
    return path


@pytest.fixture
def root(tmp_path: Path, migrated_db: Path) -> Path:
    """A fresh ``paths.root`` holding a copy of the migrated store."""
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """In-process loops of tiny layers: one thread avoids oversubscribing a shared 2-core CPU.

    Module scope, used as ``pytestmark = pytest.mark.usefixtures("one_thread")``: it is set up
    before the module's own module-scoped fixtures, which then also run on one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _resolvers():
    """Tests compose rescalelab.conf in-process, as the CLI does after registering these."""
    from rescalelab.resolvers import register_resolvers

    register_resolvers()
