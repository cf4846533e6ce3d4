"""Metric logging that outlives a briefly unreachable store and never logs a step twice.

:class:`ResilientMLFlowLogger` is the Lightning logger of every run. Each logging event (the
metrics of one step) joins a FIFO queue that a single background thread delivers with
``MlflowClient.log_batch``, oldest first, so training never waits for the store. Deliveries
are gathered: at most one write every ``batch_seconds`` (sooner when someone waits on
:meth:`flush`), because a write is mostly fixed cost (a SQLAlchemy transaction, Python
that shares the GIL with training) and one per logging step costs a small CPU step a visible
share (``rescalelab-bench``, row logging). A delivery
that fails (tracking server unreachable, SQLite busy) stays at the head of the queue and is
retried every ``retry_seconds``: while the process lives nothing is dropped and the order is
kept. ``close`` (Lightning's ``finalize``) waits up to ``flush_timeout`` seconds for the queue
to drain; what is still undelivered then is written to ``spill_path`` (JSON lines) and counted
in the run's tag ``rescalelab.undelivered_metrics``. Failed attempts that were retried with
success are counted in ``rescalelab.metric_delivery_failures``.

Steps only go up: per key, a value whose step is not above the last one logged is dropped.
Resume passes ``skip_through={key: last step in the store}``: a run resumed from a checkpoint
replays the steps between that checkpoint and the crash, and by determinism they carry the
values already logged, so the histories stay strictly increasing, without repeats and without
gaps. (Lightning logs ``epoch`` twice at an epoch's last step; it is kept once.)

Checkpoints: :class:`PendingMetrics` waits for the queue before a checkpoint is written (a few
milliseconds on a healthy store) and stores in the checkpoint whatever is still queued, so a
crash during an outage loses no step that the checkpoint already covers.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from mlflow import MlflowClient
from mlflow.entities import Metric
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

# MLflow's per-request limit on metrics (``MAX_METRICS_PER_BATCH``).
MAX_BATCH = 1000
CHECKPOINT_KEY = "rescalelab.pending_metrics"
_Item = tuple[str, float, int, int]  # key, value, timestamp (ms), step


class ResilientMLFlowLogger(MLFlowLogger):
    """An ``MLFlowLogger`` bound to an existing run that queues, retries and de-duplicates.

    It never creates a run and never talks to the store from the training thread, so an
    unreachable store cannot stop training.
    """

    def __init__(
        self,
        *,
        experiment_name: str,
        tracking_uri: str,
        run_id: str,
        skip_through: Mapping[str, int] | None = None,
        retry_seconds: float = 2.0,
        batch_seconds: float = 2.0,
        flush_timeout: float = 120.0,
        spill_path: str | Path | None = None,
    ) -> None:
        super().__init__(
            experiment_name=experiment_name,
            tracking_uri=tracking_uri,
            run_id=run_id,
            log_model=False,
        )
        self._initialized = True  # the run exists: no lookup (MLFlowLogger.experiment) needed
        self.skip_through = dict(skip_through or {})
        self.retry_seconds, self.flush_timeout = retry_seconds, flush_timeout
        self.batch_seconds = batch_seconds
        self._waiters = 0  # threads inside flush(): deliver now, do not gather
        self.spill_path = Path(spill_path) if spill_path else None
        self._queue: deque[_Item] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = self._give_up = self._closed = False
        self.failures = self.delivered = self.skipped = 0
        self.last_error: str | None = None
        self._failing = False

    @property
    def experiment(self) -> MlflowClient:
        return self._mlflow_client

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DDP ranks receive the trainer pickled: no lock or thread crosses over.
        state = self.__dict__.copy()
        state.update(_cv=None, _thread=None, _queue=list(self._queue))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cv, self._queue = threading.Condition(), deque(state["_queue"])

    # -- Lightning's logger interface ------------------------------------------------------
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now, step = int(time.time() * 1000), step or 0
        items = []
        for k, v in metrics.items():
            if isinstance(v, str):
                continue
            items.append((re.sub("[^a-zA-Z0-9_/. -]+", "", k), float(v), now, step))
        self.enqueue(items)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        # The run's params are written by TrackedRun; Lightning only passes the module's
        # (empty) hparams here, and an empty call must not need the store.
        if params:
            try:
                super().log_hyperparams(params)
            except Exception as e:  # noqa: BLE001 - params are also in the config artifact
                print(f"warning: could not log hyperparameters: {e}", file=sys.stderr)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        # The run's status is set by TrackedRun.end, after this flush.
        self.close()

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        pass

    # -- the queue -------------------------------------------------------------------------
    def enqueue(self, items: list[_Item]) -> None:
        """Queue ``(key, value, timestamp_ms, step)`` items. Per key, steps only go up: an item
        whose step is not above the last one stored or queued for its key is dropped."""
        keep = []
        for it in items:
            if it[3] > self.skip_through.get(it[0], -1):
                self.skip_through[it[0]] = it[3]
                keep.append(it)
        self.skipped += len(items) - len(keep)
        if not keep:
            return
        with self._cv:
            if self._closed:
                return
            self._queue.extend(keep)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._deliver, name="rescalelab-metrics", daemon=True
                )
                self._thread.start()
            self._cv.notify_all()

    def pending(self) -> list[_Item]:
        """What is queued and not yet confirmed delivered (including a batch in flight)."""
        with self._cv:
            return list(self._queue)

    @property
    def healthy(self) -> bool:
        """False while deliveries fail (then nobody should wait for the queue)."""
        return not self._failing

    def flush(self, timeout: float) -> bool:
        """Wait until the queue is empty, at most ``timeout`` seconds; True if it is."""
        with self._cv:
            self._waiters += 1
            self._cv.notify_all()
            try:
                return self._cv.wait_for(lambda: not self._queue, timeout=max(timeout, 0.0))
            finally:
                self._waiters -= 1

    def _deliver(self) -> None:
        last = -float("inf")
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._closing)
                due = last + self.batch_seconds
                self._cv.wait_for(
                    lambda due=due: self._closing or self._waiters > 0
                    or len(self._queue) >= MAX_BATCH or time.monotonic() >= due,
                    timeout=max(due - time.monotonic(), 0.0),
                )  # fmt: skip
                if not self._queue or self._give_up:
                    return
                batch = list(itertools.islice(self._queue, 0, MAX_BATCH))
            try:
                self._mlflow_client.log_batch(
                    self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in batch]
                )
            except Exception as e:  # noqa: BLE001 - any failure: keep the batch, retry later
                with self._cv:
                    self.failures += 1
                    self._failing = True
                    self.last_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    if self.failures == 1:
                        print(
                            f"warning: metrics not delivered to {self._tracking_uri}, "
                            f"retrying every {self.retry_seconds:g} s: {self.last_error}",
                            file=sys.stderr,
                        )
                    self._cv.notify_all()
                    self._cv.wait_for(lambda: self._give_up, timeout=self.retry_seconds)
                continue
            last = time.monotonic()
            with self._cv:
                if self._give_up:  # close() already counted this batch as undelivered
                    return
                for _ in batch:
                    self._queue.popleft()
                self.delivered += len(batch)
                self._failing = False
                self._cv.notify_all()

    def close(self, timeout: float | None = None) -> int:
        """Deliver what is queued (waiting at most ``timeout`` s, default ``flush_timeout``),
        record what could not be delivered, stop the thread; return the undelivered count."""
        with self._cv:
            if self._closed:
                return 0
            self._closing = True
            self._cv.notify_all()
        self.flush(self.flush_timeout if timeout is None else timeout)
        with self._cv:
            self._give_up, self._closed = True, True
            left = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self._report(left)
        return len(left)

    def _report(self, left: list[_Item]) -> None:
        tags = {}
        if self.failures:
            tags["rescalelab.metric_delivery_failures"] = str(self.failures)
        if left:
            tags["rescalelab.undelivered_metrics"] = str(len(left))
            where = ""
            if self.spill_path is not None:
                self.spill_path.parent.mkdir(parents=True, exist_ok=True)
                with self.spill_path.open("a") as f:
                    for k, v, t, s in left:
                        f.write(json.dumps({"key": k, "value": v, "timestamp": t, "step": s}))
                        f.write("\n")
                where = f"; they are in {self.spill_path}"
            print(
                f"warning: {len(left)} metric values could not be delivered to "
                f"{self._tracking_uri} ({self.last_error}){where}",
                file=sys.stderr,
            )
        if tags:
            try:
                for k, v in tags.items():
                    self._mlflow_client.set_tag(self.run_id, k, v)
            except Exception as e:  # noqa: BLE001 - the warning above already says it
                print(f"warning: could not tag run {self.run_id}: {e}", file=sys.stderr)


class PendingMetrics(Callback):
    """Makes checkpoints and the metric queue agree (see the module docstring)."""

    def __init__(self, flush_timeout: float = 30.0) -> None:
        self.flush_timeout = flush_timeout

    @staticmethod
    def _logger(trainer: pl.Trainer) -> ResilientMLFlowLogger | None:
        found = [lg for lg in trainer.loggers if isinstance(lg, ResilientMLFlowLogger)]
        return found[0] if found else None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        logger = self._logger(trainer)
        if logger is None:
            return
        logger.flush(self.flush_timeout if logger.healthy else 0.0)
        pending = logger.pending()
        if pending:
            checkpoint[CHECKPOINT_KEY] = [list(it) for it in pending]

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        logger = self._logger(trainer)
        items = checkpoint.get(CHECKPOINT_KEY) or []
        if logger is not None and items:
            logger.enqueue([(str(k), float(v), int(t), int(s)) for k, v, t, s in items])
