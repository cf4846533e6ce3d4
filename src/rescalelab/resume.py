"""Resume a run in its own output directory: which checkpoint, which MLflow run, which config.

A run's output directory (``hydra.run.dir``; in a sweep ``<hydra.sweep.dir>/<job number>``)
holds::

    checkpoints/last.ckpt   the latest state: every callbacks.last.every_n_train_steps steps
                            (mid-epoch), after every epoch, and on SIGINT/SIGTERM
                            (:mod:`rescalelab.callbacks.checkpoint`)
    checkpoints/best.ckpt   the best state by callbacks.checkpoint.monitor
    mlflow_run_id           the id of the run's MLflow run
    run_overrides.yaml      the overrides the run started with

``resume=true`` with the same ``hydra.run.dir`` recomposes the config from
``run_overrides.yaml`` (the command's own overrides are applied after them), reopens the *same*
MLflow run and lets Lightning restore from ``last.ckpt``: weights and buffers (BN and whitening
statistics), optimizer and schedule state, loop counters, the callbacks' state, the data
position (:class:`~rescalelab.data.TensorBatches`' epoch and batch) and, through
:class:`~rescalelab.callbacks.checkpoint.RngState`, the global random generators. ``ckpt_path=<file>`` picks another
checkpoint; it continues the run of the current output directory if that directory has one,
else it starts a new run from that state.

A job that SLURM requeued (``SLURM_RESTART_COUNT`` > 0) resumes the run of its output directory
without ``resume=true``; jobs that submitit requeues get ``resume=true`` from
:mod:`hydra_plugins.rescalelab_plugins.submitit_requeue`.

Every checkpoint is read (``torch.load``) before anything is tracked. An unreadable
``last.ckpt`` (empty, truncated) is replaced by the newest readable checkpoint of the same
folder (``best.ckpt``: an earlier state of the same run, so the replayed steps log what they
logged before), with one line saying so; ``last.ckpt.staged`` is never used, since its step's
metrics may not have reached the store. With none readable it is one line, exit 2, and the run
is left as it was (still resumable once the file is dealt with).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig

from rescalelab.errors import ConfigError

# Keys a resumed run may change: where things go and how they are shown, not the experiment.
MAY_CHANGE = (
    "paths.", "logger.", "hydra.", "resume", "ckpt_path", "trainer.enable_progress_bar",
    "callbacks.progress.",
)  # fmt: skip
# Keys the one-house redesign renamed: a run recorded before it cannot be resumed (its
# recorded params and its checkpoint's optimizer state are of the old config), and the
# error says what the key is now called.
RENAMED = {
    "optim.layer_scale": "param_groups.layer_scale",
    "optim.decay_exclude": "param_groups.decay_exclude",
    "schedule.interval": "lr_scheduler_config.interval",
    "schedule.frequency": "lr_scheduler_config.frequency",
}
RUN_ID_FILE = "mlflow_run_id"
OVERRIDES_FILE = "run_overrides.yaml"
LAST_CKPT = Path("checkpoints") / "last.ckpt"


@dataclass(frozen=True)
class ResumePlan:
    """What a ``resume=true`` / ``ckpt_path=...`` job continues from."""

    ckpt_path: str | None  # None: the run never reached a checkpoint (restart from step 0)
    run_id: str | None  # None: a new MLflow run (ckpt_path from another directory)
    overrides: list[str]  # the run's original overrides, then this command's
    recomposed: bool  # overrides differ from this command's: compose the config again


def override_key(override: str) -> str:
    """``+optim.nesterov=true`` -> ``optim.nesterov``."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(original: list[str], current: list[str]) -> list[str]:
    """The original overrides whose key this command does not set, then this command's."""
    keys = {override_key(o) for o in current}
    return [o for o in original if override_key(o) not in keys] + list(current)


def _read_run_id(directory: Path) -> str | None:
    path = directory / RUN_ID_FILE
    return path.read_text().strip() or None if path.is_file() else None


def plan_resume(
    cfg: DictConfig, output_dir: str | Path, overrides: list[str], multirun: bool
) -> ResumePlan | None:
    """Decide what this job resumes; ``None`` when it starts afresh.

    Raises :class:`ConfigError` (before anything is tracked) when ``ckpt_path`` is not a file,
    or when ``resume=true`` names a single-run directory that holds no run. In a sweep
    (``-m ... resume=true hydra.sweep.dir=<dir>``) a job that never started simply starts.
    """
    resume, ckpt = bool(cfg.get("resume") or False), cfg.get("ckpt_path")
    out = Path(output_dir)
    run_id = _read_run_id(out)
    if not resume and ckpt is None and run_id is not None and requeued():
        # SLURM started this job again (requeued after a preemption or a node failure) with
        # the command it was submitted with: it continues its run rather than replacing it.
        print(
            f"requeued (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']}): resuming run "
            f"{run_id} of {out}",
            file=sys.stderr,
        )
        resume = True
    if not resume and ckpt is None:
        return None
    if ckpt is not None:
        ckpt_file: Path | None = Path(str(ckpt)).expanduser()
        if not ckpt_file.is_file():
            raise ConfigError(f"ckpt_path={ckpt} is invalid: expected an existing checkpoint file")
        step, problem = read_checkpoint(ckpt_file)
        if problem:
            raise ConfigError(
                f"ckpt_path={ckpt} is invalid: {problem}; expected a checkpoint torch.load reads"
            )
    else:
        ckpt_file = out / LAST_CKPT if (out / LAST_CKPT).is_file() else None
        if ckpt_file is not None:
            ckpt_file = _readable_or_fallback(ckpt_file, run_id)
    if run_id is None and ckpt_file is None:
        if multirun:
            return None
        raise ConfigError(
            f"resume=true is invalid here: {out} holds no run to resume (no {RUN_ID_FILE}, "
            f"no {LAST_CKPT}); expected hydra.run.dir=<the output directory of the run>"
        )
    original_file = out / OVERRIDES_FILE
    if run_id is not None and original_file.is_file():
        original = [str(o) for o in yaml.safe_load(original_file.read_text()) or []]
        merged = merge_overrides(original, overrides)
    else:
        merged = list(overrides)
    return ResumePlan(
        ckpt_path=str(ckpt_file) if ckpt_file else None,
        run_id=run_id,
        overrides=merged,
        recomposed=merged != list(overrides),
    )


def requeued() -> bool:
    """This process is a SLURM job that SLURM requeued (``SLURM_RESTART_COUNT`` > 0)."""
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return count.isdigit() and int(count) > 0


def read_checkpoint(path: Path) -> tuple[int | None, str | None]:
    """``(global_step, None)`` for a checkpoint Lightning can resume from, else
    ``(None, why not)``. It is read whole, as Lightning will read it: a truncated file fails."""
    try:
        if path.stat().st_size == 0:
            return None, "the file is empty"
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any reason the load fails is the reason
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"torch.load cannot read it ({type(e).__name__}: {detail[:160]})"
    if not isinstance(ckpt, dict) or not {"state_dict", "global_step", "loops"} <= ckpt.keys():
        return None, "it is not a Lightning training checkpoint (no state_dict, global_step, loops)"
    return int(ckpt["global_step"]), None


def _readable_or_fallback(last: Path, run_id: str | None) -> Path:
    """``last`` if it reads; else the newest readable ``*.ckpt`` beside it (said in one line);
    else :class:`ConfigError`."""
    _, problem = read_checkpoint(last)
    if problem is None:
        return last
    found = []
    for other in sorted(last.parent.glob("*.ckpt")):
        if other != last:
            step, bad = read_checkpoint(other)
            if bad is None and step is not None:
                found.append((step, other.name, other))
    if not found:
        run = f"run {run_id}" if run_id else "the run"
        raise ConfigError(
            f"resume=true is invalid here: {last} cannot be resumed from ({problem}) and "
            f"{last.parent} holds no other readable checkpoint; expected a readable last.ckpt "
            f"(or move it away to restart {run} from step 0, or pass ckpt_path=<a checkpoint>)"
        )
    step, _, path = max(found)
    print(
        f"warning: {last} cannot be resumed from ({problem}): resuming from {path} "
        f"(global step {step}) instead",
        file=sys.stderr,
    )
    return path


def write_run_files(output_dir: str | Path, run_id: str, overrides: list[str]) -> None:
    """Leave the run id and the original overrides where ``resume=true`` finds them."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_ID_FILE).write_text(run_id + "\n")
    (out / OVERRIDES_FILE).write_text(yaml.safe_dump(list(overrides), default_flow_style=False))


def check_unchanged(recorded: Mapping[str, str], now: Mapping[str, str]) -> None:
    """A resumed run keeps the experiment it started with: every param of this command's
    config (``now``, flattened) must equal the run's ``recorded`` one, except :data:`MAY_CHANGE`
    and values MLflow cut (their full value is in the run's ``config/`` artifact)."""
    for key, value in sorted(now.items()):
        then = recorded.get(key)
        if key.startswith(MAY_CHANGE) or (then or "").endswith("see config/ artifact]"):
            continue
        if value != then:
            raise ConfigError(
                f"{key}={value} is invalid with resume=true: the run being resumed has "
                f"{key}={then} (a resumed run keeps the config it started with)"
            )


def renamed_hint(overrides: list[str]) -> str:
    """``; optim.layer_scale is now param_groups.layer_scale ...`` for recorded overrides of
    renamed keys (empty if none)."""
    old = [k for k in dict.fromkeys(override_key(o) for o in overrides) if k in RENAMED]
    if not old:
        return ""
    now = ", ".join(f"{k} is now {RENAMED[k]}" for k in old)
    return (
        f"; {now}: the run was recorded before that rename and cannot be resumed, start a new "
        "run with the new key"
    )
