"""``last.ckpt`` for resuming: every N steps (mid-epoch), and on SIGINT/SIGTERM; RNG states.

A checkpoint taken at the end of training step k holds the state *after* step k, but Lightning
logs step k's metrics only after the end-of-batch hooks. A crash between the two would leave
step k out of the metric histories forever (the resumed run starts at step k + 1). So
:class:`LastCheckpoint` *stages* the checkpoint at the end of step k (``last.ckpt.staged``) and
*commits* it (an atomic rename onto ``last.ckpt``) at the next hook (the next batch start, the
validation start, the epoch's end, the end of training), once the metric queue has delivered
step k's metrics: the commit waits for the queue
(:meth:`~rescalelab.tracking.resilient.ResilientMLFlowLogger.flush`), so that a checkpoint asked
for every N steps is committed at exactly those steps (one store write every N steps, measured
in docs/reliability.md). While the store is unreachable nothing is committed and nobody waits:
the previous ``last.ckpt`` stays, and a crash replays from there rather than losing steps.
End-of-epoch checkpoints (``callbacks.checkpoint``, ``save_last``) come after the epoch's
metrics are logged and need no staging.

SIGINT/SIGTERM set a flag; at the end of the current step the checkpoint is staged, committed
at the next hook, and :class:`Interrupted` stops the fit (the run ends KILLED; ``resume=true``
continues it). A second SIGINT stops at once. SIGUSR2, when someone handles it (submitit: SLURM's
warning before a time-out or a preemption), is held back the same way: once the checkpoint is
committed, the signal goes to that handler, which requeues the job
(:mod:`hydra_plugins.rescalelab_plugins.submitit_requeue`).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from rescalelab.errors import FLAG, Expect, at_least, checked, number_at_least, required

# The same words as the rules of Lightning's ModelCheckpoint keys (callbacks.*.dirpath, ...).
FOLDER = Expect(str, lambda v: bool(v), "a folder")
FILE_NAME = Expect(str, lambda v: bool(v) and "/" not in v, "a file name")


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped training; ``checkpoint`` is the state to resume from."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "no new checkpoint"
        super().__init__(f"{name}: training stopped ({where})")
        self.signum, self.checkpoint = signum, checkpoint


@checked(
    "callbacks.last",
    dirpath=required(FOLDER),
    filename=required(FILE_NAME),
    every_n_train_steps=at_least(1, "an integer >= 1 or null"),
    on_signal=FLAG,
    flush_timeout=number_at_least(0),
)
class LastCheckpoint(Callback):
    """Keeps ``<dirpath>/<filename>.ckpt`` current for ``resume=true`` (see the module docstring).

    ``every_n_train_steps``: stage a checkpoint every this many optimizer steps (``null``: only
    on signals). ``on_signal``: handle SIGINT/SIGTERM. ``flush_timeout``: how long a commit waits
    for the metric queue (seconds >= 0, only while deliveries succeed). Each argument is checked
    on every call (``errors.checked``), and by ``validate.check_targets`` before anything is built.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    # Held back to the end of the step, then passed on, when a handler is installed (submitit's).
    HANDED_ON = (signal.SIGUSR2,)

    def __init__(
        self,
        dirpath: str,
        filename: str = "last",
        every_n_train_steps: int | None = 100,
        on_signal: bool = True,
        flush_timeout: float = 30.0,
    ) -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.staged = Path(f"{self.path}.staged")
        self.every, self.on_signal, self.flush_timeout = (
            every_n_train_steps,
            on_signal,
            flush_timeout,
        )
        self.signum: int | None = None
        self._staged_step: int | None = None
        self._previous: dict[int, Any] = {}

    # -- signals ---------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now
        self.signum = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installs its SIGTERM handler in Trainer._run, before this hook, and restores
        # the original handlers at teardown; ours replaces it for the duration of training.
        if self.on_signal and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            for sig in self.HANDED_ON:
                if callable(signal.getsignal(sig)):
                    self._previous[sig] = signal.signal(sig, self._handle)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    # -- stage and commit --------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        due = self.every is not None and trainer.global_step % self.every == 0
        signalled = self.signum is not None
        if self.on_signal and trainer.world_size > 1:
            # Saving is collective: every rank stops at the same step if any rank got the signal.
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
            if signalled and self.signum is None:
                self.signum = signal.SIGTERM
        if due or signalled:
            if trainer.is_global_zero:
                self.staged.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(self.staged, weights_only=False)
            self._staged_step = trainer.global_step

    def _commit(self, trainer: pl.Trainer) -> None:
        if self._staged_step is not None:
            committed = self._metrics_delivered(trainer)
            if trainer.is_global_zero and self.staged.exists():
                if committed:
                    os.replace(self.staged, self.path)
                else:
                    self.staged.unlink()
            step, self._staged_step = self._staged_step, None
            if self.signum is not None:
                signum, previous = self.signum, self._previous.get(self.signum)
                self._restore_handlers()
                where = str(self.path) if committed else None
                if signum in self.HANDED_ON and callable(previous):
                    name = signal.Signals(signum).name
                    print(
                        f"{name}: training stopped at step {step} (checkpoint {where}); "
                        "passing the signal on to its handler",
                        file=sys.stderr,
                        flush=True,
                    )
                    previous(signum, None)  # submitit: requeue the job, then exit
                raise Interrupted(signum, where)

    def _metrics_delivered(self, trainer: pl.Trainer) -> bool:
        flush = [getattr(lg, "flush", None) for lg in trainer.loggers]
        waits = [f for f in flush if callable(f)]
        healthy = all(getattr(lg, "healthy", True) for lg in trainer.loggers)
        return all(f(self.flush_timeout if healthy else 0.0) for f in waits)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Step k's metrics are queued after its end-of-batch hooks: the first hook after them
        # commits the checkpoint staged at step k, waiting for them. Not waiting (committing
        # only if the gathered delivery happened to be out) let a later stage replace the
        # waiting one: asked every 10 steps of 48, only steps 10, 20 and 40 were committed.
        self._commit(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._commit(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._commit(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._staged_step is not None:
            self.signum = None  # training is over anyway: commit, do not stop
            self._commit(trainer)
        self._restore_handlers()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # A staged state whose metrics may not be out (or a diverged one) is never committed.
        if trainer.is_global_zero and self.staged.exists():
            self.staged.unlink()
        self._staged_step = None
        self._restore_handlers()


class RngState(Callback):
    """Saves and restores the global generators (torch CPU and CUDA, numpy, Python).

    Lightning's checkpoints do not hold them. They matter to whatever draws from the global
    generators during training (dropout, random probes); data order and augmentation use their
    own generators seeded from (seed, epoch, batch).
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        torch.set_rng_state(state_dict["torch"])
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
