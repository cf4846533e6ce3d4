"""Fits timed through Lightning: the bare loop's work under a stripped ``Trainer.fit``
(Lightning's own floor) and a full rescalelab fit composed from ``rescalelab.conf``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig

from rescalelab.bench.steps import synthetic
from rescalelab.bench.timing import FitClock
from rescalelab.fit import build_components
from rescalelab.models import SmallCNN
from rescalelab.resolvers import register_resolvers
from rescalelab.tracking import TrackedRun


class _Batches:
    """Batches of ``(x, y)`` gathered in a fresh random order each epoch (as the bare loop)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.g = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.x) // self.batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=self.g).to(self.x.device)
        for k in range(len(self)):
            idx = order[k * self.batch : (k + 1) * self.batch]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


class _Plain(pl.LightningModule):
    """The bare loop's model and optimizer as a LightningModule with nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.model = SmallCNN((3, 32, 32), 10)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def lightning_timer(batch: int, steps: int, device: str) -> Callable[[], float]:
    """Lightning alone: ``Trainer.fit`` of the bare loop's work, stripped as Lightning's own
    parity benchmark strips it (no logger, progress bar, checkpointing or model summary)."""
    x, y = synthetic(batch * steps, (3, 32, 32), 10, device)
    batches = _Batches(x, y, batch)

    def run() -> float:
        clock = FitClock()
        trainer = pl.Trainer(
            accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_epochs=1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, callbacks=[clock],
        )  # fmt: skip
        trainer.fit(_Plain(), train_dataloaders=batches)
        return clock.per_step()

    return run


def fit_config(root: Path, output_dir: Path, overrides: list[str]) -> DictConfig:
    """``train.yaml`` for one benchmark fit under ``root`` (no validation), ``overrides`` last;
    as the CLI composes it, with the resolvers registered (also for ``scripts/bench_drift.py``)."""
    register_resolvers()
    with initialize_config_module("rescalelab.conf", version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.root={root}",
                f"paths.output_dir={output_dir}",
                "+trainer.limit_val_batches=0",
                *overrides,
            ],
        )


def fit_timer(
    root: Path, overrides: list[str], steps: int, batch: int, *, logger: bool = True,
    epochs: int = 1,
) -> Callable[[], float]:  # fmt: skip
    """A function running a full rescalelab fit of ``steps`` steps in ``epochs`` epochs; returns
    seconds per step.

    Everything a user's ``rescalelab-train`` does per step is inside the clock (Lightning's loop,
    progress bar, checkpointing, MLflow logging); one-time setup (building the MLflow run and the
    Trainer) is outside it.
    """
    counter = {"n": 0}

    def run() -> float:
        counter["n"] += 1
        out = root / f"fit{counter['n']}"
        cfg = fit_config(root, out, [
            f"data.num_train={batch * (steps // epochs)}",
            "data.num_val=256",
            f"data.batch_size={batch}",
            f"trainer.max_epochs={epochs}",
            # The bar's per-batch bookkeeping is timed; its drawing goes nowhere, so that the
            # benchmark's output is its table, not one bar per fit.
            "+callbacks.progress.console_kwargs={quiet:true}",
            *overrides,
        ])  # fmt: skip
        parts = build_components(cfg)
        clock = FitClock()
        tracked = None
        if logger:
            tracked = TrackedRun.start(
                cfg, tracking_uri=cfg.logger.tracking_uri, experiment_name="bench-fits",
                overrides=overrides, output_dir=str(out),
            )  # fmt: skip
        trainer = instantiate(
            cfg.trainer, callbacks=[*parts["callbacks"], clock],
            logger=tracked.logger() if tracked else False,
        )  # fmt: skip
        trainer.fit(parts["module"], datamodule=parts["datamodule"])
        if tracked:
            tracked.end("FINISHED")
        return clock.per_step()

    return run
