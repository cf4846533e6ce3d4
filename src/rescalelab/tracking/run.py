"""One training job's MLflow run: name, params, tags, config artifacts, parent, final status.

Lightning's ``MLFlowLogger`` only writes metrics into the run created here (it receives the
run id), so everything a run *is* — its name, its place under a sweep's parent run, its
config — is decided in this one module.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import DictConfig, OmegaConf

import rescalelab
from rescalelab.errors import ConfigError
from rescalelab.tracking.environment import (
    SystemMetrics,
    choice_tags,
    log_dataset,
    log_environment,
)
from rescalelab.tracking.options import option_params
from rescalelab.tracking.resilient import ResilientMLFlowLogger
from rescalelab.tracking.store import ensure_experiment

PARENT_FILE = "mlflow_parent.json"
# Overrides that say where things go, not what the experiment is: left out of run names.
_NOT_IN_NAME = ("paths.", "logger.", "hydra.", "trainer.enable_progress_bar", "resume", "ckpt_path")


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """``{"optim.lr": "0.1", ...}`` for every leaf of a nested dict/list config."""
    out: dict[str, str] = {}
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(cfg, list) and any(isinstance(v, (dict, list)) for v in cfg):
        for i, v in enumerate(cfg):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = json.dumps(cfg) if isinstance(cfg, list) else str(cfg)
    return out


def run_name(
    overrides: list[str], job_num: int | None = None, swept_keys: list[str] | None = None
) -> str:
    """A readable run name from the experiment-defining overrides, e.g. ``norm=bn optim.lr=0.1``.

    In a sweep only the swept keys name the child, followed by its job number: ``norm=bn #3``.
    """
    parts = [o for o in overrides if not o.lstrip("+~").startswith(_NOT_IN_NAME)]
    if swept_keys is not None:
        parts = [o for o in parts if o.lstrip("+~").split("=", 1)[0] in swept_keys]
    name = " ".join(parts) or "default"
    return name if job_num is None else f"{name} #{job_num}"


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """``<mlflow> ui --backend-store-uri <store>``, then on a second line the run's URL in it.

    ``<mlflow>`` is plain ``mlflow`` when that is on ``PATH`` and is this interpreter's (an
    activated venv), else the full path of the one beside this interpreter. A tracking server
    is browsed directly: only its URL is given.
    """
    # MLflow 3.17's UI keeps a per-browser GenAI / Model-training switch; this URL parameter
    # opens the model-training pages whatever the browser last showed.
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    page += "?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    beside = Path(sys.executable).parent / "mlflow"
    on_path = shutil.which("mlflow")
    if beside.exists() and not (on_path and Path(on_path).resolve() == beside.resolve()):
        mlflow = shlex.quote(str(beside))
    else:
        mlflow = "mlflow"
    return (
        f"{mlflow} ui --backend-store-uri {shlex.quote(tracking_uri)}\n"
        f"   this run: http://127.0.0.1:5000/{page}"
    )


def _swept_values(overrides: list[str], swept_keys: list[str]) -> dict[str, str]:
    """``{key: value}`` of this job's overrides whose key the sweep sweeps."""
    pairs = (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return {k: v for k, v in pairs if k in swept_keys}


def git_commit(cwd: str | Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_parent(sweep_dir: str | Path) -> dict[str, Any] | None:
    """What the sweep callback left in ``sweep_dir``: ``run_id``, ``swept_keys`` (or ``None``)."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.exists() else None


class MlflowRunFactory:
    """What ``logger=mlflow`` builds: the factory of the job's MLflow run, not a Lightning logger.

    The config group is ``logger`` because it says where the metrics go (the keys users type:
    ``logger.tracking_uri``, ``logger.experiment_name``, ...), but a Lightning logger needs the
    run it writes into, and that run is created only after the checks and the resume plan.
    So fit.py builds this factory from ``cfg.logger``; :meth:`start` creates the job's run
    (:class:`TrackedRun`; :class:`ReplicaRun` on ranks > 0) or :meth:`reopen` continues one, and
    that run's ``logger()`` is the Lightning logger the Trainer gets::

        conf/logger/mlflow.yaml -> MlflowRunFactory -> .start() / .reopen() -> TrackedRun
            -> .logger() -> ResilientMLFlowLogger (tracking/resilient.py) -> Trainer(logger=...)
    """

    def __init__(
        self, tracking_uri: str, experiment_name: str = "rescalelab", log_model: bool = False,
        system_metrics: float | None = 10.0,
    ) -> None:  # fmt: skip
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        self.log_model = log_model  # log the final checkpoints as artifacts (fit.py)
        self.system_metrics = system_metrics  # seconds between samples; null: none

    def start(self, cfg: DictConfig, **kwargs: Any) -> TrackedRun | ReplicaRun:
        """One run per job: ranks that torchrun/srun started run the job too, but only global
        rank 0 creates the run (the others get a :class:`ReplicaRun` and never touch the store)."""
        from rescalelab.distributed import launch_rank

        start = TrackedRun.start if launch_rank() == 0 else ReplicaRun.start
        return start(
            cfg, tracking_uri=self.tracking_uri, experiment_name=self.experiment_name,
            system_metrics=self.system_metrics, **kwargs,
        )  # fmt: skip

    def reopen(self, run_id: str) -> TrackedRun | ReplicaRun:
        """The existing run ``run_id``, to resume it (rank 0 only, as :meth:`start`)."""
        from rescalelab.distributed import launch_rank

        if launch_rank() != 0:
            return ReplicaRun(self.tracking_uri, self.experiment_name)
        run = TrackedRun.reopen(self.tracking_uri, self.experiment_name, run_id)
        run.system_metrics = self.system_metrics
        return run


class TrackedRun:
    """Creates the MLflow run of a training job and hands Lightning a logger bound to it."""

    def __init__(self, tracking_uri: str, experiment_name: str, run_id: str) -> None:
        self.tracking_uri, self.experiment_name, self.run_id = tracking_uri, experiment_name, run_id
        self.client = MlflowClient(tracking_uri)
        self.system_metrics: float | None = 10.0  # sampling interval (s) when (re)started
        self._monitor: SystemMetrics | None = None

    @classmethod
    def start(
        cls,
        cfg: DictConfig,
        *,
        tracking_uri: str,
        experiment_name: str,
        overrides: list[str],
        output_dir: str,
        job_num: int | None = None,
        parent: dict[str, Any] | None = None,
        extra_params: dict[str, Any] | None = None,
        extra_tags: dict[str, str] | None = None,
        system_metrics: float | None = 10.0,
    ) -> TrackedRun:
        experiment_id = ensure_experiment(tracking_uri, experiment_name)
        client = MlflowClient(tracking_uri)
        tags = {
            "rescalelab.overrides": " ".join(overrides),
            "rescalelab.output_dir": str(output_dir),
            "rescalelab.version": rescalelab.__version__,
            "mlflow.source.name": "rescalelab-train",
            "host": socket.gethostname(),
        }
        commit = git_commit(Path(rescalelab.__file__).parent)
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if parent:
            tags["mlflow.parentRunId"] = parent["run_id"]
        tags.update(choice_tags(_swept_values(overrides, parent["swept_keys"] if parent else [])))
        tags.update(extra_tags or {})
        run = client.create_run(
            experiment_id,
            run_name=run_name(overrides, job_num, parent["swept_keys"])
            if parent
            else run_name(overrides),
            tags=tags,
        )
        self = cls(tracking_uri, experiment_name, run.info.run_id)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        params = flatten(resolved)
        params.update(option_params())  # norm=whitening…: filters by option name
        params.update({k: str(v) for k, v in (extra_params or {}).items()})
        self.log_params(params)
        self.log_config(cfg, output_dir)
        self.set_tags(log_environment(client, self.run_id, Path(rescalelab.__file__).parent))
        self.system_metrics = system_metrics
        self.start_system_metrics()
        return self

    def start_system_metrics(self, resume: bool = False) -> None:
        """MLflow's system-metrics monitor on this run (every ``system_metrics`` seconds)."""
        if self.system_metrics and self._monitor is None:
            self._monitor = SystemMetrics(
                self.tracking_uri, self.run_id, self.system_metrics, resume=resume
            )

    def log_dataset(self, datamodule: Any, data_cfg: DictConfig) -> None:
        """The run's dataset input (name, digest, source) for the UI's Dataset column."""
        log_dataset(self.client, self.run_id, datamodule, OmegaConf.to_container(data_cfg))

    def log_params(self, params: dict[str, str]) -> None:
        """Params in batches of 100; values longer than MLflow's limit are cut *visibly*
        (the full value is in the ``config/`` artifacts)."""
        items = []
        for k, v in sorted(params.items()):
            if len(v) > MAX_PARAM_VAL_LENGTH:
                v = v[: MAX_PARAM_VAL_LENGTH - 40] + "…[truncated: see config/ artifact]"
            items.append(Param(k, v))
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_config(self, cfg: DictConfig, output_dir: str) -> None:
        """The resolved config, and Hydra's own ``.hydra/`` files (config, overrides, hydra)."""
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            self.client.log_artifacts(self.run_id, tmp, "config")
        hydra_dir = Path(output_dir) / ".hydra"
        if hydra_dir.is_dir():
            self.client.log_artifacts(self.run_id, str(hydra_dir), "config/hydra")

    def log_files(self, files: dict[str, Path], artifact_path: str) -> None:
        """Log each existing file of ``files`` as ``<artifact_path>/<its key>``."""
        files = {name: Path(p) for name, p in files.items() if Path(p).is_file()}
        if not files:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, path in files.items():
                shutil.copyfile(path, Path(tmp, name))
            self.client.log_artifacts(self.run_id, tmp, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def logger(self, **options: Any) -> ResilientMLFlowLogger:
        """A Lightning logger writing into this run (it never creates a run of its own);
        ``options`` go to :class:`~rescalelab.tracking.resilient.ResilientMLFlowLogger`."""
        return ResilientMLFlowLogger(
            experiment_name=self.experiment_name,
            tracking_uri=self.tracking_uri,
            run_id=self.run_id,
            **options,
        )

    @classmethod
    def reopen(cls, tracking_uri: str, experiment_name: str, run_id: str) -> TrackedRun:
        """The existing run ``run_id``, to resume it (:class:`ConfigError` if the store lacks it)."""
        client = MlflowClient(tracking_uri)
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ConfigError(
                f"resume: run {run_id} is not in logger.tracking_uri={tracking_uri}: expected "
                "the store the run was started in"
            ) from None
        return cls(tracking_uri, experiment_name, run_id)

    def recorded(self) -> Run:
        """The run as the store holds it now (status, params, tags, latest metrics)."""
        return self.client.get_run(self.run_id)

    def last_steps(self) -> dict[str, int]:
        """The last step logged for each metric: what a resumed run must not log again."""
        keys = self.recorded().data.metrics
        return {
            k: max(m.step for m in self.client.get_metric_history(self.run_id, k)) for k in keys
        }

    def mark_resumed(self) -> None:
        """Back to ``RUNNING``, with ``rescalelab.resumes`` counting the resumptions."""
        resumes = int(self.recorded().data.tags.get("rescalelab.resumes", "0")) + 1
        self.client.update_run(self.run_id, status="RUNNING")
        self.set_tags({"rescalelab.resumes": str(resumes), "rescalelab.status": "running"})
        self.start_system_metrics(resume=True)

    def log_checkpoint(self, path: str | Path) -> None:
        """A checkpoint file as an artifact under ``checkpoints/`` (``logger.log_model=true``)."""
        self.client.log_artifact(self.run_id, str(path), "checkpoints")

    def end(self, status: str) -> None:
        """Set the final status: ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if self._monitor is not None:  # its last sample first: the run must still be RUNNING
            monitor, self._monitor = self._monitor, None
            monitor.stop()
        self.client.set_terminated(self.run_id, status)

    def ui_command(self) -> str:
        """What to type to browse this run, and its address: runnable as printed."""
        # The experiment's id, not its name, makes the URL: asked of the store once it is over,
        # so an unreachable store costs the URL line, never the run's outcome.
        try:
            experiment_id = self.client.get_run(self.run_id).info.experiment_id
        except Exception:
            if self.tracking_uri.startswith(("http://", "https://")):
                return self.tracking_uri
            return ui_hint(self.tracking_uri, "0").split("\n")[0]  # the command, not the URL
        return ui_hint(self.tracking_uri, experiment_id, self.run_id)


class ReplicaRun:
    """The job's run as seen by a rank other than global rank 0 of torchrun/srun-started ranks.

    Every such rank runs the whole Hydra app, but only rank 0 creates the run; this stand-in
    never touches the store (it needs no run id). Its logger has rank 0's class — so every
    rank's trainer has the same callbacks and loggers — and rank-zero-only methods, bound to an
    address that reaches nothing, should anything ever bypass that.
    """

    run_id: str | None = None

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name

    @classmethod
    def start(
        cls, cfg: DictConfig, *, tracking_uri: str, experiment_name: str, **_: Any
    ) -> ReplicaRun:
        """Same signature as :meth:`TrackedRun.start`; creates nothing."""
        return cls(tracking_uri, experiment_name)

    def logger(self, **options: Any) -> ResilientMLFlowLogger:
        # Its MlflowClient is built for an address that reaches nothing (building it for the
        # real store would open, even create, a SQLite file); rank-zero-only methods never use it.
        return ResilientMLFlowLogger(
            experiment_name=self.experiment_name,
            tracking_uri="http://replica-rank.invalid",
            run_id="",
            **options,
        )

    def end(self, status: str) -> None:
        """Rank 0 sets the status."""
