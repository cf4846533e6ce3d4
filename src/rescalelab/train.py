"""``rescalelab-train`` / ``python -m rescalelab.train``: compose, validate, build, track, fit.

The order matters: every check that can fail on bad input (config values, dataset files, model
and data compatibility, optimizer arguments) runs *before* the MLflow run is created, so bad
input leaves nothing in the store. Once the run exists, any exception ends it FAILED (an
interrupt ends it KILLED) and re-raises, so what was logged stays logged.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ProgressBar
from rich.console import Console

from rescalelab.errors import ConfigError
from rescalelab.models.geometry import layer_geometry, rescalable_layers
from rescalelab.module import Classifier
from rescalelab.optim import build_optimizer, build_scheduler
from rescalelab.tracking import read_parent
from rescalelab.validate import validate

console = Console(stderr=True)


def _build(group: str, cfg: DictConfig, **kwargs: Any) -> Any:
    """``instantiate`` with constructor errors turned into one line naming the group."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        detail = str(cause or e).strip().splitlines()[-1]
        raise ConfigError(f"{group} ({cfg.get('_target_')}): {detail}") from None


def build_components(cfg: DictConfig) -> dict[str, Any]:
    """Everything a fit needs, built and checked, with no side effect on the tracking store."""
    validate(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = _build("data", cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    norm = _build("norm", cfg.norm)
    model = _build(
        "model", cfg.model, input_shape=datamodule.input_shape,
        num_classes=datamodule.num_classes, norm=norm,
    )  # fmt: skip
    if norm.name not in ("none", "bn") and not rescalable_layers(model):
        raise ConfigError(
            f"norm={norm.name} is invalid for this model: it has no Conv2d/Linear layer"
        )
    geometry = layer_geometry(model, datamodule.input_shape)
    norm.prepare(model, datamodule.input_shape)
    # Build the optimizer and schedule once now, so that their errors come before the run.
    try:
        optimizer = build_optimizer(cfg.optim, model, geometry)
        build_scheduler(cfg.schedule, optimizer)
    except (InstantiationException, TypeError, ValueError) as e:
        detail = str(e.__cause__ or e).strip().splitlines()[-1]
        raise ConfigError(f"optim ({cfg.optim.get('_target_')}) / schedule: {detail}") from None
    module = Classifier(model, datamodule.num_classes, cfg.optim, cfg.schedule, norm, geometry)
    callbacks = [
        _build(f"callbacks.{name}", c) for name, c in (cfg.get("callbacks") or {}).items()
        if c is not None and "_target_" in c
    ]  # fmt: skip
    if not cfg.trainer.get("enable_progress_bar", True):
        # trainer.enable_progress_bar=false is the one switch: it also drops the bar callback.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return {"datamodule": datamodule, "module": module, "callbacks": callbacks, "norm": norm}


def train(cfg: DictConfig) -> float | None:
    """Run one job; return the final ``val/loss`` (what sweepers minimise)."""
    hc = HydraConfig.get()
    parts = build_components(cfg)
    multirun = hc.mode == RunMode.MULTIRUN
    tracking = _build("logger", cfg.logger)  # rescalelab.tracking.MlflowTracking
    run = tracking.start(
        cfg,
        overrides=list(hc.overrides.task),
        output_dir=hc.runtime.output_dir,
        job_num=hc.job.num if multirun else None,
        parent=read_parent(hc.sweep.dir) if multirun else None,
        extra_params={f"data.{k}": v for k, v in parts["datamodule"].describe().items()},
    )
    trainer = _build("trainer", cfg.trainer, callbacks=parts["callbacks"], logger=run.logger())
    try:
        trainer.fit(parts["module"], datamodule=parts["datamodule"])
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    if trainer.interrupted:
        run.end("KILLED")
        return None
    run.end("FINISHED")
    console.print(
        f"[bold green]run {run.run_id} finished[/] ({run.experiment_name})", soft_wrap=True
    )
    console.print(f"browse it: [bold]{run.ui_command()}[/]", soft_wrap=True)
    val_loss = trainer.callback_metrics.get("val/loss")
    return float(val_loss) if val_loss is not None else None


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
