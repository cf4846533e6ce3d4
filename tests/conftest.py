"""Shared fixtures: a real (pre-migrated) SQLite MLflow store per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


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
