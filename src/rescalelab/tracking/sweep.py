"""Hydra callback that makes a multirun one MLflow experiment: a parent run with the jobs as children.

``on_multirun_start`` runs once in the launching process, before any job: it checks every job
of the sweep (:func:`rescalelab.preflight.check_sweep`: a bad job is one line, exit 2, and
nothing is tracked), creates the store and the experiment (so parallel jobs never race on a
fresh SQLite file) and the parent run, and leaves the parent's id in
``<sweep dir>/mlflow_parent.json`` where every job (same process, joblib worker or SLURM task)
finds it. With ``resume=true`` the parent run named there is reopened (RUNNING again, its tag
``rescalelab.resumes`` counted) instead of a new one: resumed and new jobs stay under it.

The swept keys are those of the command line's sweep overrides (``optim.lr=0.1,0.2``) *and*
of ``hydra.sweeper.params`` (what presets and ``hparams_search`` configs sweep); they name the
children and define the report's configurations.

When the multirun ends, the sweep report (:mod:`rescalelab.analysis.sweep_report`) is logged to the
parent, which ends ``FINISHED``, or ``FAILED`` when a job raised. Hydra does not call
``on_multirun_end`` when a job raised (the sweeper re-raises the job's exception), so the parent
is also closed from an ``atexit`` hook: ``FAILED`` after an exception, ``KILLED`` after Ctrl-C.
"""

from __future__ import annotations

import atexit
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from rescalelab.analysis.budget import budget_info
from rescalelab.analysis.summary import finish_sweep, record_start
from rescalelab.console import quiet_stack
from rescalelab.errors import ConfigError, exit_bad_input
from rescalelab.preflight import check_sweep
from rescalelab.tracking.run import PARENT_FILE, read_parent
from rescalelab.tracking.store import ensure_experiment

FAILED_FILE = "failed_jobs.txt"  # one line per job that raised, written by the job's process


def swept_keys(cli_overrides: list[str], sweeper_params: dict[str, Any] | None) -> list[str]:
    """Keys that take several values in this sweep, as the sweepers combine them.

    ``hydra.sweeper.params`` (``{"seed": "0,1,2"}``; optuna's ``interval(…)``, ``tag(log, …)``)
    come first and the command line's overrides replace them key by key
    (``optim.lr=0.1,1`` narrows a preset's grid; ``seed=0`` stops sweeping the seed).
    """
    parser = OverridesParser.create()
    sweeps: dict[str, bool] = {}
    candidates = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(cli_overrides)
    for text in candidates:
        try:
            (override,) = parser.parse_overrides([text])
        except Exception:  # not parseable as an override: nothing to name children by
            continue
        sweeps[override.key_or_group] = override.is_sweep_override()
    return [k for k, is_sweep in sweeps.items() if is_sweep]


def parent_name(preset: str | None, overrides: list[str], swept: list[str], when: datetime) -> str:
    """What differs between sweeps first (the UI cuts long names): the preset, the swept keys
    (``key=values`` as typed, for those of the command line), then the start time."""
    typed = {o.lstrip("+~").split("=", 1)[0]: o.lstrip("+~") for o in overrides if "=" in o}
    keys = " ".join(typed.get(k, k) for k in swept)
    return " ".join(p for p in (preset or "sweep", keys, f"{when:%Y-%m-%d %H:%M:%S}") if p)


def parent_status(multirun_ended: bool, failed_jobs: int, last_exception: object) -> str:
    """``FINISHED`` only when the multirun ended normally and no job raised."""
    if isinstance(last_exception, KeyboardInterrupt):
        return "KILLED"
    if not multirun_ended or failed_jobs:
        return "FAILED"
    return "FINISHED"


class MlflowSweepCallback(Callback):
    """Parent run per multirun; the sweep report at the end; FINISHED, or FAILED if a job raised.

    ``report``: build and log the sweep report when the multirun ends (``true`` by default).
    ``report_metric``: the metric of the report's curves and tuning curves.
    ``target_ratio``: the tuneability target, as a fraction of the initial loss.
    """

    def __init__(
        self, report: bool = True, report_metric: str = "train/loss", target_ratio: float = 0.01
    ) -> None:
        self.report, self.report_metric, self.target_ratio = report, report_metric, target_ratio
        self._parent: tuple[str, str] | None = None
        self._sweep_dir: Path | None = None
        self._closed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The launcher sets this too, later; resolving hydra.sweep.dir (and ${paths.root},
        # which reads hydra:runtime.cwd) needs it now. ${now:} is cached, so the dir is the same.
        HydraConfig.instance().set_config(config)
        quiet_stack()  # before the store is created: MLflow's "Creating initial tables" lines
        uri = str(OmegaConf.select(config, "logger.tracking_uri"))
        name = str(OmegaConf.select(config, "logger.experiment_name"))
        overrides = list(HydraConfig.get().overrides.task)
        params = OmegaConf.select(config, "hydra.sweeper.params")
        # resolved: presets write ``seed: range(0,${n_seeds})``
        params = OmegaConf.to_container(params, resolve=True) if params is not None else None
        swept = swept_keys(overrides, params)
        budget = budget_info(config)  # an equal tuning budget sweeps its space's keys too
        swept += [k for k in (budget or {}).get("keys", []) if k not in swept]
        try:  # every job, before anything exists: a bad one is one line, exit 2, no parent
            check_sweep(config, overrides, swept)
        except ConfigError as e:
            exit_bad_input(e)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        experiment_id = ensure_experiment(uri, name)
        client = MlflowClient(uri)
        if OmegaConf.select(config, "resume", default=False) is True:
            old = self._reattach(client, sweep_dir, uri)
            if old is not None:
                self._parent, self._sweep_dir, self._closed = (uri, old), sweep_dir, False
                atexit.register(self._close_at_exit)
                return
        choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
        run = client.create_run(
            experiment_id,
            run_name=parent_name(choices.get("experiment"), overrides, swept, datetime.now()),
            tags={
                "rescalelab.sweep": "parent",
                "rescalelab.overrides": " ".join(overrides),
                "rescalelab.sweep_dir": str(sweep_dir.resolve()),
                "rescalelab.swept_keys": json.dumps(swept),
                "rescalelab.sweeper_params": json.dumps(params or {}),
                "rescalelab.experiment": str(choices.get("experiment") or ""),
                "rescalelab.launcher": str(choices.get("hydra/launcher") or ""),
                "rescalelab.sweeper": str(choices.get("hydra/sweeper") or ""),
                "mlflow.source.name": "rescalelab-train -m",
            },
        )
        values = {**(params or {}), **dict(o.split("=", 1) for o in overrides if "=" in o)}
        record_start(client, run.info.run_id, config, swept, values)
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
        self._parent, self._sweep_dir, self._closed = (uri, run.info.run_id), sweep_dir, False
        atexit.register(self._close_at_exit)

    def _reattach(self, client: MlflowClient, sweep_dir: Path, uri: str) -> str | None:
        """``resume=true``: the parent run of ``sweep_dir`` (its ``mlflow_parent.json``), back to
        RUNNING with ``rescalelab.resumes`` counted, or ``None`` when there is none to reopen."""
        parent = read_parent(sweep_dir)
        if parent is None or parent.get("tracking_uri", uri) != uri:
            return None
        try:
            run = client.get_run(parent["run_id"])
        except MlflowException:
            return None  # the parent is not in this store: open a new one
        resumes = int(run.data.tags.get("rescalelab.resumes", "0")) + 1
        client.update_run(run.info.run_id, status="RUNNING")
        client.set_tag(run.info.run_id, "rescalelab.resumes", str(resumes))
        # The jobs that failed before run again: their failures no longer count.
        (sweep_dir / FAILED_FILE).unlink(missing_ok=True)
        print(f"resuming the sweep in {sweep_dir}: parent run {run.info.run_id}", file=sys.stderr)
        return run.info.run_id

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Runs in the job's process (a joblib worker, too): record a job that raised."""
        if job_return.status != JobStatus.FAILED:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        line = f"{config.hydra.job.num}\t{' '.join(job_return.overrides or [])}\n"
        with open(sweep_dir / FAILED_FILE, "a") as f:  # one short append per failed job
            f.write(line)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close(multirun_ended=True)

    def _close_at_exit(self) -> None:
        if not self._closed:
            # An uncaught exception (Ctrl-C) is left in sys.last_exc / sys.last_value.
            last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
            self._close(multirun_ended=False, last_exception=last)

    def _failed_jobs(self) -> list[str]:
        path = self._sweep_dir / FAILED_FILE if self._sweep_dir else None
        return path.read_text().splitlines() if path and path.exists() else []

    def _close(self, multirun_ended: bool, last_exception: object = None) -> None:
        if self._parent is None or self._closed:
            return
        self._closed = True
        uri, run_id = self._parent
        client = MlflowClient(uri)
        failed = self._failed_jobs()
        status = parent_status(multirun_ended, len(failed), last_exception)
        client.set_tag(run_id, "rescalelab.failed_jobs", str(len(failed)))
        # aborted: the sweeper stopped early (a job raised, or exited: a ConfigError exits 2)
        client.set_tag(run_id, "rescalelab.sweep_end", "completed" if multirun_ended else "aborted")
        if self.report and status != "KILLED":
            # Imported here: matplotlib and pandas are only needed once the sweep is over.
            from rescalelab.analysis.sweep_report import log_report

            try:
                report = log_report(
                    uri, run_id, metric=self.report_metric, target_ratio=self.target_ratio
                )
                finish_sweep(client, run_id, report, uri, self.report_metric)
            except Exception as e:  # a report problem must not hide the sweep's own outcome
                client.set_tag(run_id, "rescalelab.report", f"failed: {type(e).__name__}: {e}")
                print(f"warning: the sweep report failed: {e}", file=sys.stderr)
        client.set_terminated(run_id, status)
