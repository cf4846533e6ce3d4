"""``hparams_search=optuna_lr``'s study storage: a SQLite file that works from the first trial.

The Optuna sweeper (``hydra-optuna-sweeper``, which allows ``optuna<3``) opens its storage with
``optuna.create_study(storage=url, load_if_exists=True)``, so a stored study is continued by
the same command. But optuna 2.10 records its schema version on a connection that SQLAlchemy 2
(what MLflow needs) never commits, so a fresh SQLite storage fails optuna's own check
(``assert version is not None`` in ``get_current_version``). :class:`PrepareOptunaStorage`
opens the storage once, before the sweeper does, with ``isolation_level=AUTOCOMMIT``: the
tables and the version are written for good, and the sweeper's own (transactional) storage then
opens it as usual. Storages that are not SQLite URLs are left alone.
"""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class PrepareOptunaStorage(Callback):
    """Hydra callback: create (or check) ``hydra.sweeper.storage`` before the sweep starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        url = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if isinstance(url, str) and url.startswith("sqlite:"):
            prepare_sqlite_storage(url)


def prepare_sqlite_storage(url: str) -> None:
    """Create the optuna tables of ``url`` and commit their schema version (idempotent)."""
    from optuna.storages import RDBStorage

    storage = RDBStorage(url, engine_kwargs={"isolation_level": "AUTOCOMMIT"})
    storage.engine.dispose()
