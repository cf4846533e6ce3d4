"""One job: build, track, fit (what :func:`rescalelab.train.app` runs once the config is valid).

The order matters: every check that can fail on bad input (config values, dataset files, model
and data compatibility, optimizer arguments) runs *before* the MLflow run is created, so bad
input leaves nothing in the store. Once the run exists, any exception ends it FAILED (an
interrupt ends it KILLED) and re-raises, so what was logged stays logged. A diverged run ends
FAILED, tagged ``rescalelab.status=diverged``, and the job returns normally (a sweep goes on).
``resume=true`` reopens the run of the output directory instead of creating one (resume.py).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar

from rescalelab.callbacks.checkpoint import Interrupted, RngState
from rescalelab.callbacks.guard import Diverged
from rescalelab.console import console, quiet_stack
from rescalelab.distributed import check_launch
from rescalelab.errors import ConfigError
from rescalelab.geometry import layer_geometry, rescalable_layers
from rescalelab.module import Classifier
from rescalelab.resume import check_unchanged, plan_resume, renamed_hint, write_run_files
from rescalelab.tracking import TrackedRun, flatten, read_parent
from rescalelab.tracking.resilient import PendingMetrics
from rescalelab.validate import check_added_keys, check_num_classes, check_targets, validate


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
    """Everything a fit needs, built and checked, with no side effect on the tracking store.

    ``cfg`` has passed :func:`~rescalelab.validate.validate`. The optimizer side is built as
    partials: the optimizer and its schedule are made once, by Lightning, in
    ``configure_optimizers``; their constructors' checks run here first (``check_targets``).
    """
    check_launch(cfg)  # CUDA present, devices, nodes, launcher
    check_targets(cfg)  # each constructor's own argument checks, before anything is built
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = _build("data", cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_num_classes(cfg, datamodule.num_classes)  # an explicit model.num_classes must agree
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
    norm.prepare(model, geometry)
    # Partials (optimizer, schedule, groups): Lightning calls them once, in configure_optimizers.
    optimizer, schedule = _build("optim", cfg.optim), _build("schedule", cfg.schedule)
    module = Classifier(
        model, datamodule.num_classes, optimizer, schedule, norm, geometry,
        groups=_build("param_groups", cfg.param_groups),
        lr_scheduler_config=OmegaConf.to_container(cfg.lr_scheduler_config, resolve=True),
    )  # fmt: skip
    callbacks = [
        _build(f"callbacks.{name}", c) for name, c in (cfg.get("callbacks") or {}).items()
        if c is not None and "_target_" in c
    ]  # fmt: skip
    if not cfg.trainer.get("enable_progress_bar", True):
        # trainer.enable_progress_bar=false is the one switch: it also drops the bar callback.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return {"datamodule": datamodule, "module": module, "callbacks": callbacks, "norm": norm}


def train(cfg: DictConfig) -> float | None:
    """Run one job; return the optimized metric (``val/loss`` by default), what sweepers use.

    A diverged run returns +inf (-inf when the sweeper maximizes), so that a sweep goes on and
    ranks it last. ``resume=true`` continues the run of this output directory (``resume.py``).
    """
    quiet_stack()
    hc = HydraConfig.get()
    output_dir = hc.runtime.output_dir
    cfg, plan, overrides = _plan(cfg, hc)
    parts = build_components(cfg)
    # runner: a job that is not a Lightning fit (experiment=theory_diminishing: many SG seeds
    # at once, rescalelab.theory_runs); planned here so that its errors come before the run.
    runner = _build("runner", cfg.runner) if cfg.get("runner") is not None else None
    if runner is not None:
        runner.plan(cfg, parts)
    tracking = _build("logger", cfg.logger)  # rescalelab.tracking.MlflowRunFactory
    metric = cfg.get("optimized_metric") or "val/loss"
    run, skip, done = _open_run(cfg, hc, tracking, plan, parts, overrides, metric)
    if done is not None:
        return done[0]
    logger = None
    with _ends_run_on_error(run, lambda: logger):
        logger = run.logger(
            skip_through=skip, spill_path=Path(output_dir) / "undelivered_metrics.jsonl"
        )
        callbacks = [*parts["callbacks"], RngState(), PendingMetrics()]
        # callbacks.checkpoint=null means no checkpoint files: Lightning must not add its own.
        has_ckpt = any(isinstance(c, ModelCheckpoint) for c in callbacks)
        no_default = {} if has_ckpt else {"enable_checkpointing": False}
        trainer = _build("trainer", cfg.trainer, callbacks=callbacks, logger=logger, **no_default)
        try:
            if runner is not None:
                runner.run(cfg, parts, logger)
            else:
                trainer.fit(
                    parts["module"],
                    datamodule=parts["datamodule"],
                    ckpt_path=plan.ckpt_path if plan is not None else None,
                )
        except Diverged as d:
            _finish(run, logger, "FAILED", {
                "rescalelab.status": "diverged",
                "rescalelab.diverged_step": str(d.step),
                "rescalelab.diverged_loss": str(d.loss),
                "rescalelab.diverged_reason": d.reason,
            })  # fmt: skip
            console.print(f"[bold red]run {run.run_id} diverged[/]: {d}", soft_wrap=True)
            return _diverged_value(hc)
        except Interrupted as e:  # ended KILLED by _ends_run_on_error, as any interrupt
            console.print(
                f"[bold yellow]{e}[/]; continue it with: rescalelab-train resume=true "
                f"hydra.run.dir={output_dir}",
                soft_wrap=True,
            )
            if e.signum == signal.SIGINT:
                raise KeyboardInterrupt from None
            sys.exit(128 + e.signum)
    if trainer.interrupted:
        _finish(run, logger, "KILLED", {"rescalelab.status": "killed"})
        return None
    if getattr(tracking, "log_model", False) and isinstance(run, TrackedRun):
        for ckpt in sorted((Path(output_dir) / "checkpoints").glob("*.ckpt")):
            run.log_checkpoint(ckpt)
    _finish(run, logger, "FINISHED", {"rescalelab.status": "finished"})
    if run.run_id is not None:  # None on ranks > 0 started by torchrun/srun: rank 0 reports
        console.print(
            f"[bold green]run {run.run_id} finished[/] ({run.experiment_name})", soft_wrap=True
        )
        console.print(f"browse it: [bold]{run.ui_command()}[/]", soft_wrap=True)
    # What sweepers (hparams_search=optuna_lr) optimise: optimized_metric, else val/loss.
    value = trainer.callback_metrics.get(metric)
    return float(value) if value is not None else None


def _plan(cfg: DictConfig, hc: Any) -> tuple[DictConfig, Any, list[str]]:
    """The job's checked config, its resume plan (``None``: a fresh run) and its overrides.

    The values are checked once per config: this one (``resume`` and ``ckpt_path`` are used
    at once), and the config of a resumed run when its overrides compose a different one.
    """
    overrides = list(hc.overrides.task)
    validate(cfg)
    plan = plan_resume(cfg, hc.runtime.output_dir, overrides, hc.mode == RunMode.MULTIRUN)
    if plan is not None and plan.recomposed:
        overrides = plan.overrides
        cfg = _compose_again(hc.job.config_name or "train", overrides)
        validate(cfg)
    check_added_keys(cfg, overrides)
    return cfg, plan, overrides


def _open_run(
    cfg: DictConfig,
    hc: Any,
    tracking: Any,
    plan: Any,
    parts: dict[str, Any],
    overrides: list[str],
    metric: str,
) -> tuple[Any, dict[str, int], tuple[float | None] | None]:
    """The job's run: reopened (resume) or created, with its run files and dataset logged.

    Returns ``(run, skip, done)``: ``skip`` the last logged step of each metric (a resume logs
    nothing twice); ``done`` holds the recorded result of a run that needs no training.
    """
    extra_params = {f"data.{k}": v for k, v in parts["datamodule"].describe().items()}
    if plan is not None and plan.run_id is not None:
        run = tracking.reopen(plan.run_id)
        if not isinstance(run, TrackedRun):
            return run, {}, None
        # A changed value is an error even when the run is over: it would not be this run.
        now = flatten(OmegaConf.to_container(cfg, resolve=True))
        now.update({k: str(v) for k, v in extra_params.items()})
        check_unchanged(run.recorded().data.params, now)
        done, value = _already_done(run, metric, _diverged_value(hc))
        if done:
            return run, {}, (value,)
        skip = run.last_steps()
        run.mark_resumed()
        return run, skip, None
    multirun = hc.mode == RunMode.MULTIRUN
    run = tracking.start(
        cfg,
        overrides=overrides,
        output_dir=hc.runtime.output_dir,
        job_num=hc.job.num if multirun else None,
        parent=read_parent(hc.sweep.dir) if multirun else None,
        extra_params=extra_params,
    )
    if run.run_id is not None:
        with _ends_run_on_error(run):  # e.g. a full disk: the run must not stay RUNNING
            write_run_files(hc.runtime.output_dir, run.run_id, overrides)
            # Files that define the data exactly (e.g. an ImageNet subset's file list).
            run.log_files(getattr(parts["datamodule"], "artifacts", {}), "data")
            run.log_dataset(parts["datamodule"], cfg.data)  # the UI's Dataset column
    return run, {}, None


def _compose_again(config_name: str, overrides: list[str]) -> DictConfig:
    """The config of a resumed run: its original overrides, then this command's."""
    try:
        return compose(config_name=config_name, overrides=overrides)
    except HydraException as e:
        detail = str(e).strip().splitlines()[0]
        raise ConfigError(
            f"resume=true: the run's overrides no longer compose: {detail}"
            + renamed_hint(overrides)
        ) from None


def _diverged_value(hc: Any) -> float:
    direction = str(OmegaConf.select(hc, "sweeper.direction", default="minimize"))
    return -math.inf if "maximize" in direction else math.inf


def _already_done(run: TrackedRun, metric: str, diverged: float) -> tuple[bool, float | None]:
    """A resumed run that finished (or diverged) is not trained again: its recorded result."""
    recorded = run.recorded()
    if recorded.data.tags.get("rescalelab.status") == "diverged":
        console.print(f"run {run.run_id} diverged before: not resumed", soft_wrap=True)
        return True, diverged
    if recorded.info.status == "FINISHED":
        console.print(f"run {run.run_id} already finished: nothing to resume", soft_wrap=True)
        value = recorded.data.metrics.get(metric)
        return True, float(value) if value is not None else None
    return False, None


def _failure_tags(error: BaseException) -> dict[str, str]:
    """``rescalelab.status=failed`` and the reason: ``OSError: [Errno 28] No space left …``."""
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return {"rescalelab.status": "failed", "rescalelab.failed_reason": reason[:500]}


@contextlib.contextmanager
def _ends_run_on_error(run: Any, logger: Callable[[], Any] = lambda: None) -> Iterator[None]:
    """Once the run exists: an exception ends it FAILED (an interrupt KILLED: Lightning turns
    Ctrl+C into ``sys.exit(1)``, its SIGTERMException is a SystemExit), with the reason tagged,
    after the queued metrics of ``logger()`` (once there is one) are delivered; re-raised."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        _finish(run, logger(), "KILLED", {"rescalelab.status": "killed"})
        raise
    except BaseException as e:
        _finish(run, logger(), "FAILED", _failure_tags(e))
        raise


END_RETRY_SECONDS = 120.0  # how long the final status waits for a store that went away
RETRY_SECONDS = 2.0


def _finish(run: Any, logger: Any, status: str, tags: dict[str, str]) -> None:
    """Deliver the queued metrics, tag the outcome, set the final status.

    The status is retried like the metrics (every ``RETRY_SECONDS``, at most
    ``END_RETRY_SECONDS``): a run that ends while its tracking server restarts must not stay
    RUNNING. What still fails then is one warning line; the outcome is never a traceback.
    """
    close = getattr(logger, "close", None)
    if callable(close):
        close()
    deadline = time.monotonic() + END_RETRY_SECONDS
    while True:
        try:
            if isinstance(run, TrackedRun):
                run.set_tags(tags)
            run.end(status)
            return
        except Exception as e:  # noqa: BLE001 - any store failure: retry, then say so
            if time.monotonic() + RETRY_SECONDS > deadline:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                console.print(f"warning: could not set run {run.run_id} to {status}: {first}")
                return
            time.sleep(RETRY_SECONDS)
