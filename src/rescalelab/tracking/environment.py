"""What a run records about where it ran and on what data, with MLflow's own features.

- **Environment** (:func:`environment_tags`, :func:`log_environment`): tags ``env.python``,
  ``env.torch``, ``env.cuda``, ``env.cudnn``, ``env.lightning``, ``env.mlflow``, ``env.hydra``;
  ``rescalelab.git_dirty`` (``true``/``false``) with the diff against ``HEAD`` as the artifact
  ``environment/git_diff.patch`` when dirty; ``environment/pip_freeze.txt``: every installed
  distribution as ``name==version`` (``-e <url>`` for editable installs), what ``pip freeze``
  prints, read in-process from ``importlib.metadata`` (a ``pip freeze`` subprocess would start
  pip in every job).
- **Choices** (:func:`choice_tags`): ``choice.<group>`` for every config group's chosen option
  (``choice.norm=bn``) and ``swept.<key>`` for a sweep child's swept values: tags, which the UI
  shows apart from the ~60 alphabetical params, and which the runs table can show as columns.
- **Dataset lineage** (:func:`log_dataset`): one ``log_inputs`` dataset per run, so the UI's
  Dataset column names the data and its digest: sha256 of the data config (``batch_size``
  aside), the data module's ``describe()`` (sizes; an ImageNet subset's ``subset_hash``; a convex
  problem's generator parameters and constants) and, for CIFAR-10, the md5 of its files.
- **System metrics** (:class:`SystemMetrics`): MLflow's ``SystemMetricsMonitor`` on the run
  (``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``, disk,
  network, and ``system/gpu_*`` when ``nvidia-ml-py`` finds a GPU), in the process that owns the
  run: global rank 0 under DDP (Lightning-spawned or torchrun-started ranks never create runs).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag

_GROUPS = (
    "data", "model", "norm", "optim", "schedule", "trainer", "callbacks", "logger", "method",
    "experiment", "hparams_search", "hydra/launcher", "hydra/sweeper",
)  # fmt: skip


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def environment_tags() -> dict[str, str]:
    """Versions of the stack this run used (``none`` when absent: CUDA on a CPU build)."""
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "env.python": platform.python_version(),
        "env.torch": torch.__version__,
        "env.cuda": str(torch.version.cuda or "none"),
        "env.cudnn": str(cudnn or "none"),
        "env.lightning": _version("pytorch-lightning"),
        "env.mlflow": _version("mlflow"),
        "env.hydra": _version("hydra-core"),
    }


def pip_freeze() -> str:
    """``pip freeze``'s list from ``importlib.metadata``: ``name==version``, editable ``-e url``."""
    lines = set()
    for d in importlib.metadata.distributions():
        name = d.metadata["Name"]
        if not name:
            continue
        url = json.loads(d.read_text("direct_url.json") or "{}")
        if url.get("dir_info", {}).get("editable"):
            lines.add(f"-e {url['url']}  # {name}=={d.version}")
        else:
            lines.add(f"{name}=={d.version}")
    return "\n".join(sorted(lines, key=str.lower)) + "\n"


def git_state(cwd: str | Path) -> tuple[bool | None, str]:
    """``(dirty, patch)`` of the git tree holding ``cwd``: ``git status`` and ``git diff HEAD``;
    ``(None, "")`` outside a git tree."""

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain")
    if status is None or status.returncode != 0:
        return None, ""
    if not status.stdout.strip():
        return False, ""
    diff = git("diff", "HEAD")
    header = "".join(f"# {line}\n" for line in status.stdout.splitlines())
    return True, f"# git status --porcelain\n{header}\n{diff.stdout if diff else ''}"


def log_environment(client: MlflowClient, run_id: str, source_dir: str | Path) -> dict[str, str]:
    """Log ``environment/pip_freeze.txt`` (and ``git_diff.patch`` when dirty); return the tags
    (versions, ``rescalelab.git_dirty``) for the caller to set with the run's other tags."""
    tags = environment_tags()
    dirty, patch = git_state(source_dir)
    if dirty is not None:
        tags["rescalelab.git_dirty"] = str(dirty).lower()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "pip_freeze.txt").write_text(pip_freeze())
        if dirty:
            Path(tmp, "git_diff.patch").write_text(patch)
        client.log_artifacts(run_id, tmp, "environment")
    return tags


def choice_tags(swept: dict[str, str] | None = None) -> dict[str, str]:
    """``choice.<group>``: the option chosen in each group (from Hydra's runtime choices, when a
    Hydra app runs); ``swept.<key>``: the values of this sweep child's swept keys."""
    from hydra.core.hydra_config import HydraConfig

    tags: dict[str, str] = {}
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        for group in _GROUPS:
            value = choices.get(group)
            if value is not None:
                tags[f"choice.{group.replace('/', '.')}"] = str(value)
    for key, value in (swept or {}).items():
        tags[f"swept.{key}"] = value
    return tags


def _cifar10_md5(datamodule: Any) -> dict[str, str]:
    """md5 of the CIFAR-10 files the module reads (empty for any other module)."""
    from rescalelab.data import cifar10

    if not isinstance(datamodule, cifar10.CIFAR10):
        return {}
    folder = cifar10.find_batches(datamodule.root)
    out = {}
    for name in [*cifar10.TRAIN_FILES, cifar10.TEST_FILE, cifar10.META_FILE]:
        h = hashlib.md5()
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[name] = h.hexdigest()
    return out


def dataset_entity(datamodule: Any, data_cfg: dict[str, Any]) -> Dataset:
    """The run's dataset: named after the data module class, digest over what defines it."""
    defining = {k: v for k, v in data_cfg.items() if k not in ("batch_size",)}
    profile = {"describe": datamodule.describe(), "md5": _cifar10_md5(datamodule)}
    blob = json.dumps({"config": defining, **profile}, sort_keys=True, default=str)
    target = str(data_cfg.get("_target_", type(datamodule).__name__))
    return Dataset(
        name=type(datamodule).__name__,
        digest=hashlib.sha256(blob.encode()).hexdigest()[:16],
        source_type="rescalelab",
        source=json.dumps({"_target_": target, **{k: str(v) for k, v in defining.items()}}),
        profile=json.dumps(profile, default=str),
    )


def log_dataset(client: MlflowClient, run_id: str, datamodule: Any, data_cfg: dict) -> None:
    """``log_inputs`` with the run's dataset (context ``training``)."""
    entity = dataset_entity(datamodule, data_cfg)
    tags = [InputTag(key="mlflow.data.context", value="training")]
    client.log_inputs(run_id, [DatasetInput(dataset=entity, tags=tags)])


class SystemMetrics:
    """MLflow's system-metrics monitor on one run, started and stopped by :class:`TrackedRun`.

    MLflow logs a sample every ``interval`` seconds (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
    wins); :meth:`stop` logs one last sample, so a run shorter than ``interval`` has one too.
    """

    def __init__(
        self, tracking_uri: str, run_id: str, interval: float = 10.0, resume: bool = False
    ) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(
            run_id, sampling_interval=interval, resume_logging=resume, tracking_uri=tracking_uri
        )
        self.monitor.collect_metrics()  # primes psutil's CPU counters for the first interval
        self.monitor.start()

    def stop(self) -> None:
        self.monitor.finish()
        self.monitor.collect_metrics()
        self.monitor.publish_metrics(self.monitor.aggregate_metrics())
        self.monitor.mlflow_logger.flush()
