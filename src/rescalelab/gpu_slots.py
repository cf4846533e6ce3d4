"""One GPU per parallel worker of a joblib multirun: ``hydra/launcher=joblib_gpus``.

joblib's (loky) workers are long-lived processes that run job after job, and CUDA reads
``CUDA_VISIBLE_DEVICES`` once, when a process first initializes it. A GPU is therefore bound to
a *worker process*, not to a job number: the first job a worker runs claims a free GPU slot — an
exclusive lock on ``<sweep dir>/.gpu_slots/gpu<id>.lock``, held until the process exits (the OS
releases it even after a crash) — and sets ``CUDA_VISIBLE_DEVICES=<id>``; the worker's later jobs
keep that GPU. With ``hydra.launcher.n_jobs`` ≤ the number of GPUs, no two concurrent jobs
share a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from rescalelab.errors import ConfigError

SLOT_DIR = ".gpu_slots"
_claimed: tuple[FileLock, str, Path] | None = None  # (lock, gpu id, slot dir) of this process


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else all of them."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and not g.strip().startswith("-")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def claim_gpu(gpus: list[str], slot_dir: Path) -> str:
    """The GPU of this process: the one it already holds, else the first free one of ``gpus``."""
    global _claimed
    if _claimed is not None:
        lock, gpu, held_dir = _claimed
        if held_dir == slot_dir:
            return gpu
        lock.release()  # a new sweep in the same process (in-process use only)
        _claimed = None
    slot_dir.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        lock = FileLock(str(slot_dir / f"gpu{gpu}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        _claimed = (lock, gpu, slot_dir)
        return gpu
    raise RuntimeError(
        f"every GPU of {gpus} is held by another worker: hydra.launcher.n_jobs must not exceed "
        "the number of GPUs"
    )


class GpuPerWorker(Callback):
    """Gives each parallel worker its own GPU (see the module docstring).

    ``gpus``: the GPU ids to share out (default: the visible ones). ``hydra.launcher.n_jobs=-1``
    becomes one worker per GPU; more workers than GPUs is an error before any job starts.
    """

    def __init__(self, gpus: list[Any] | str | None = None) -> None:
        if isinstance(gpus, str):
            gpus = gpus.split(",")
        self.gpus = [str(g).strip() for g in gpus] if gpus is not None else None
        self._slot_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        gpus = self.gpus if self.gpus is not None else visible_gpus()
        if not gpus:
            raise ConfigError(
                "hydra/launcher=joblib_gpus is invalid here: expected at least one visible GPU "
                "(CUDA_VISIBLE_DEVICES / torch.cuda.device_count() found none)"
            )
        n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs")
        if n_jobs is None or n_jobs == -1:
            with read_write(config), open_dict(config):
                config.hydra.launcher.n_jobs = len(gpus)
        elif not 1 <= int(n_jobs) <= len(gpus):
            raise ConfigError(
                f"hydra.launcher.n_jobs={n_jobs} is invalid: expected 1..{len(gpus)} "
                f"(one parallel job per GPU; GPUs {','.join(gpus)})"
            )
        self.gpus = gpus
        self._slot_dir = Path(str(config.hydra.sweep.dir)) / SLOT_DIR

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.gpus is None or self._slot_dir is None:  # not a multirun
            return
        os.environ["CUDA_VISIBLE_DEVICES"] = claim_gpu(self.gpus, self._slot_dir)
