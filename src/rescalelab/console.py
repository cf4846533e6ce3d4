"""The console of the CLI: the project's own lines through logging, the stack's noise silenced.

Hydra's job logging (``hydra.job_logging`` in ``conf/hydra/default.yaml``) gives the root logger
two handlers: the console (stderr, the bare message) and ``<job output dir>/train.log`` (time,
logger, level). Everything the project says goes to the ``rescalelab`` logger, so each job's
``train.log`` holds what its console showed.

:func:`quiet_stack` is called at *run time* by the CLI entry points, never on import: what it
silences is the user's process-wide logging and warnings state, which a library must not change
when it is merely imported (a notebook importing ``rescalelab`` keeps Lightning's messages).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from rich.text import Text

log = logging.getLogger("rescalelab")

# Lightning's rank-zero *info* lines: "GPU available: …", "TPU available: …", the litlogger
# advert, "Loading `train_dataloader` to estimate …", "`Trainer.fit` stopped: …". Its warnings
# are Python warnings and stay visible (captured into logging, hence also into train.log).
_LIGHTNING_INFO_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
# "Creating initial MLflow database tables…", "Updating database tables" on a fresh store.
# "Started monitoring system metrics." and its stop lines, on every run.
_MLFLOW_INFO_LOGGERS = (
    "mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.system_metrics",
)  # fmt: skip
# Raised inside pytorch_lightning/utilities/_pytree.py by torch >= 2.10 on every fit; nothing the
# user can act on (Lightning's own code calls the deprecated LeafSpec).
# "The number of training batches (7) is smaller than the logging interval": the module caps the
# interval at the epoch length and says so in its own line (module.cap_log_interval).
_STACK_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning),
)


def quiet_stack() -> None:
    """Silence the stack's lines the user never asked for; route warnings into logging."""
    for name in (*_LIGHTNING_INFO_LOGGERS, *_MLFLOW_INFO_LOGGERS):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message, category in _STACK_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # Remaining warnings (Lightning's hints, a user's own) reach the console *and* train.log.
    logging.captureWarnings(True)


class LogConsole:
    """``console.print(text)`` for the project's lines: rich markup stripped, sent to logging.

    Lines starting with ``warning`` are logged as warnings. Without any logging handler (the
    app was run with ``hydra/job_logging=none``) the line goes to stderr, so it is never lost.
    """

    def print(self, text: Any, *_: Any, **__: Any) -> None:
        plain = Text.from_markup(str(text)).plain
        level = logging.WARNING if plain.lower().startswith("warning") else logging.INFO
        if logging.getLogger().hasHandlers():
            log.log(level, plain)
        else:
            print(plain, file=sys.stderr)


console = LogConsole()
