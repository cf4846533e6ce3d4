"""Callbacks that tests add to a CLI run (``+callbacks.<name>._target_=tests.probes.<Class>``).

They only watch or stop the process: they draw no random number and touch no model state, so a
run with them logs what a run without them logs. The CLI subprocess imports them because the
tests put the repository root on its ``PYTHONPATH`` (:func:`probe_env`).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from tests.helpers import cli_env

REPO = Path(__file__).resolve().parents[1]


def probe_env(**extra: str) -> dict[str, str]:
    """The CLI's environment, with ``tests.probes`` importable."""
    env = cli_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


class CommitLog(Callback):
    """Appends the ``global_step`` of every new ``last.ckpt`` to ``<dirpath>/commits.jsonl``.

    It looks at every batch start and at the end of training, after the checkpoint callbacks of
    the previous hook have run, and reads the file only when its inode or mtime changed.
    """

    def __init__(self, dirpath: str) -> None:
        self.ckpt = Path(dirpath) / "checkpoints" / "last.ckpt"
        self.out = Path(dirpath) / "commits.jsonl"
        self._seen: tuple[int, int] | None = None

    def _look(self) -> None:
        try:
            st = os.stat(self.ckpt)
        except FileNotFoundError:
            return
        if (st.st_ino, st.st_mtime_ns) == self._seen:
            return
        self._seen = (st.st_ino, st.st_mtime_ns)
        step = torch.load(self.ckpt, map_location="cpu", weights_only=False)["global_step"]
        with self.out.open("a") as f:
            f.write(json.dumps({"global_step": step}) + "\n")

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._look()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._look()


def committed_steps(run_dir: Path) -> list[int]:
    path = run_dir / "commits.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["global_step"] for line in lines]


class KillAt(Callback):
    """SIGKILLs its own process at given points, each point once per output directory.

    ``steps``: at the end of these training steps (``global_step`` after the step), before the
    metrics of that step are logged. ``epoch_ends``: at the end of these epochs (0-based), after
    the end-of-epoch ``last.ckpt``, before the next epoch's first step. ``validations``: at the first validation batch of these
    epochs. A point fires only if ``<dirpath>/killed_<point>`` does not exist yet (it is
    created first), so the resumed process, which has the same callback, goes past it.
    """

    def __init__(
        self,
        dirpath: str,
        steps: list[int] | None = None,
        epoch_ends: list[int] | None = None,
        validations: list[int] | None = None,
    ) -> None:
        self.dir = Path(dirpath)
        self.steps, self.epoch_ends = list(steps or []), list(epoch_ends or [])
        self.validations = list(validations or [])

    def _kill(self, point: str) -> None:
        marker = self.dir / f"killed_{point}"
        if marker.exists():
            return
        marker.write_text("")
        os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step in self.steps:
            self._kill(f"step{trainer.global_step}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint writes the end-of-epoch last.ckpt in on_train_epoch_end, and Lightning
        # calls it after every other callback: the next epoch's start is the first hook after.
        if trainer.current_epoch - 1 in self.epoch_ends:
            self._kill(f"epoch_end{trainer.current_epoch - 1}")

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not trainer.sanity_checking and trainer.current_epoch in self.validations:
            self._kill(f"validation{trainer.current_epoch}")
