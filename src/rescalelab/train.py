"""``rescalelab-train`` / ``python -m rescalelab.train``: compose, validate, then hand over to
:mod:`rescalelab.fit` (build, track, fit).

This module imports only Hydra, OmegaConf and the checks: torch, Lightning and MLflow (most of
the start-up time) are imported once :func:`main` has composed the command line and
checked a single run's values (preflight.py), so a mistyped key or a bad value is answered
before them, with one line and exit status 2, and leaves nothing in the tracking store.
"""

from __future__ import annotations

import math
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rescalelab.errors import EXIT_DIVERGED, ConfigError, exit_bad_input
from rescalelab.preflight import check_command_line
from rescalelab.resolvers import composing


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def app(cfg: DictConfig) -> float | None:
    """The Hydra task: one job. Bad input exits 2; a single run that diverged exits 1."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        # Imported here, not at the top: see the module's docstring.
        from rescalelab.fit import train
        from rescalelab.tracking.store import check_store

        uri = OmegaConf.select(cfg, "logger.tracking_uri", default=None)
        if uri is not None:
            check_store(str(uri))  # a bad store fails in seconds, before any build
        value = train(cfg)
    except ConfigError as e:
        exit_bad_input(e)
    except KeyboardInterrupt:
        if multirun:
            raise  # stop the whole sweep
        sys.exit(128 + signal.SIGINT)
    if not multirun and value is not None and math.isinf(value):
        sys.exit(EXIT_DIVERGED)  # its run is FAILED, rescalelab.status=diverged; a sweep goes on
    return value


def main() -> None:
    """``rescalelab-train``: the command line is composed once first, so that a config Hydra
    cannot compose is one line and exit 2 (preflight.py), then Hydra runs the app."""
    with composing():  # the resolvers, registered here rather than on import
        try:
            check_command_line(sys.argv[1:])
        except ConfigError as e:
            exit_bad_input(e)
        app()


if __name__ == "__main__":
    # Call the importable rescalelab.train.main, not __main__'s copy: parallel launchers
    # (hydra/launcher=joblib) pickle the task function by reference, by its module name.
    from rescalelab.train import main as _main

    _main()
