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
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


class PrepareOptunaStorage(Callback):
    """Hydra callback: create (or check) ``hydra.sweeper.storage`` before the sweep starts.

    A continued study also gets its sampler seeded with ``seed + (trials already in it)``: with
    the same seed, the sampler would draw its first points again (its random start-up trials
    repeated the earlier trials' stepsizes), while this keeps the sweep a pure function of the
    seed and of where the study stands. Hydra calls this before it builds the sweeper.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        url = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if not (isinstance(url, str) and url.startswith("sqlite:")):
            return
        prepare_sqlite_storage(url)
        done = trials_in_study(url, str(OmegaConf.select(config, "hydra.sweeper.study_name")))
        seed = OmegaConf.select(config, "hydra.sweeper.sampler.seed", default=None)
        if done and isinstance(seed, int):
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.sweeper.sampler.seed = seed + done


def prepare_sqlite_storage(url: str) -> None:
    """Create the optuna tables of ``url`` and commit their schema version (idempotent)."""
    from optuna.storages import RDBStorage

    storage = RDBStorage(url, engine_kwargs={"isolation_level": "AUTOCOMMIT"})
    storage.engine.dispose()


def trials_in_study(url: str, study_name: str) -> int:
    """How many trials the stored study ``study_name`` holds (0 if there is none)."""
    import optuna

    for summary in optuna.get_all_study_summaries(url):
        if summary.study_name == study_name:
            return int(summary.n_trials)
    return 0
