"""Hydra callback that makes a multirun one MLflow experiment: a parent run with the jobs as children.

``on_multirun_start`` runs once in the launching process, before any job: it creates the store
and the experiment (so parallel jobs never race on a fresh SQLite file) and the parent run, and
leaves the parent's id in ``<sweep dir>/mlflow_parent.json`` where every job (same process,
joblib worker or SLURM task) finds it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from rescalelab.tracking.run import PARENT_FILE
from rescalelab.tracking.store import ensure_experiment


class MlflowSweepCallback(Callback):
    """Parent run per multirun; FINISHED when the sweep ends (FAILED if a job raised)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The launcher sets this too, later; resolving hydra.sweep.dir (and ${paths.root},
        # which reads hydra:runtime.cwd) needs it now. ${now:} is cached, so the dir is the same.
        HydraConfig.instance().set_config(config)
        uri = str(OmegaConf.select(config, "logger.tracking_uri"))
        name = str(OmegaConf.select(config, "logger.experiment_name"))
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        experiment_id = ensure_experiment(uri, name)
        overrides = list(HydraConfig.get().overrides.task)
        client = MlflowClient(uri)
        run = client.create_run(
            experiment_id,
            run_name=f"{name} sweep {datetime.now():%Y-%m-%d %H:%M:%S}",
            tags={
                "rescalelab.sweep": "parent",
                "rescalelab.overrides": " ".join(overrides),
                "rescalelab.sweep_dir": str(sweep_dir.resolve()),
                "mlflow.source.name": "rescalelab-train -m",
            },
        )
        parsed = OverridesParser.create().parse_overrides(overrides)
        swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
        (sweep_dir / PARENT_FILE).write_text(
            json.dumps(
                {
                    "run_id": run.info.run_id,
                    "tracking_uri": uri,
                    "experiment_id": experiment_id,
                    "swept_keys": swept,
                }
            )
        )
        self._parent = (uri, run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if getattr(self, "_parent", None):
            uri, run_id = self._parent
            MlflowClient(uri).set_terminated(run_id, "FINISHED")
