"""What the drift monitor keeps and leaves behind: the record of every scalar, the per-unit
arrays, and the artifact files ``drift/{arrays/epoch_<e>.npz, summary.parquet, meta.json,
figures/*.png}``.

The files are written into a local folder first (``<output_dir>/drift`` for a CLI run), then
copied into the MLflow run with :func:`rescalelab.tracking.artifacts.upload`, which never fails
the run: during a store outage the copy is skipped with a warning and the files stay local.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch

from rescalelab.tracking import artifacts

if TYPE_CHECKING:
    from rescalelab.callbacks.drift.collector import StatsCollector
    from rescalelab.callbacks.drift.monitor import DriftMonitor


def _per_key() -> defaultdict[str, list]:
    return defaultdict(list)  # a named function, unlike a lambda, pickles (DDP spawn)


def _key(layer: str, stat: str) -> str:
    return f"drift/{layer}/{stat}" if layer else f"drift/{stat}"


class Record:
    """Every scalar by step (``by_step``, and long rows for the table), the watched layers (a
    BN → whitening switch removes the BNs: they stay listed), the epoch starts and the
    per-unit arrays of the current epoch."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}
        self.rows: list[tuple[int, str, str, float]] = []
        self.layers: dict[str, dict[str, Any]] = {}
        self.epoch_starts: dict[int, int] = {}
        self.epoch_arrays: dict[str, dict[str, list]] = defaultdict(_per_key)
        self.epoch = 0  # the epoch the arrays in epoch_arrays belong to
        self.array_files: dict[str, dict[str, np.ndarray]] = {}

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.by_step.setdefault(step, {}).update(metrics)
        for k, v in metrics.items():
            parts = k.split("/")
            layer = "/".join(parts[1:-1]) if len(parts) > 2 else ""
            self.rows.append((step, layer, parts[-1], float(v)))

    def add_arrays(self, step: int, stats: dict[str, dict[str, Any]], probe: bool) -> None:
        """Per-unit vectors of one step: m, v, the estimates in use, dead units, the probe's."""
        for name, d in stats.items():
            a = self.epoch_arrays[name]
            if probe and "probe_pop" in d:
                a["probe_steps"].append(step)
                a["probe_mean"].append(d["probe_pop"][0].astype(np.float32))
                a["probe_var"].append(d["probe_pop"][1].astype(np.float32))
            if d["n"] <= 0 or "m" not in d:
                continue
            a["steps"].append(step)
            a["m"].append(d["m"].astype(np.float32))
            a["v"].append(d["v"].astype(np.float32))
            if "r_mean" in d:
                a["r_mean"].append(d["r_mean"].astype(np.float32))
                a["r_var"].append(d["r_var"].astype(np.float32))
            if "active" in d:
                a["dead"].append(d["active"] <= 0)

    def end_epoch(self, folder: Path | None) -> None:
        """The epoch's arrays as ``epoch_<e>.npz``: into ``folder/arrays`` (or kept in
        :attr:`array_files` without a folder)."""
        arrays: dict[str, np.ndarray] = {}
        for name, a in self.epoch_arrays.items():
            for k, vals in a.items():
                try:
                    arrays[f"{name}/{k}"] = np.stack([np.asarray(v) for v in vals])
                except ValueError:  # the layer changed size mid-epoch: keep each step apart
                    for i, v in enumerate(vals):
                        arrays[f"{name}/{k}/{i}"] = np.asarray(v)
        self.epoch_arrays.clear()
        if not arrays:
            return
        name = f"epoch_{self.epoch:03d}.npz"
        if folder is None:
            self.array_files[name] = arrays
        else:
            (folder / "arrays").mkdir(parents=True, exist_ok=True)
            np.savez(folder / "arrays" / name, **arrays)  # uncompressed: fast

    def remember_layout(self, collector: StatsCollector) -> None:
        """Keep every module ever watched, with its kind, units, estimates and ρ."""
        for t in collector.tracked:
            info = self.layers.setdefault(t.name, {"kind": t.kind, "units": t.units})
            if t.estimates:
                if t.estimates not in info.setdefault("estimates", []):
                    info["estimates"].append(t.estimates)
                info["rho"] = t.rho

    def table(self):
        """Every recorded scalar, long format: columns step, layer, stat, value."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["step", "layer", "stat", "value"])

    # -- checkpoints: tensors, strings and numbers only (torch.load's weights_only) ----------
    def state_dict(self) -> dict[str, Any]:
        arrays = {
            name: {
                k: [torch.from_numpy(np.asarray(v).copy()) for v in vals] for k, vals in a.items()
            }
            for name, a in self.epoch_arrays.items()
        }
        return {
            "step": torch.tensor([r[0] for r in self.rows], dtype=torch.int64),
            "layer": [r[1] for r in self.rows],
            "stat": [r[2] for r in self.rows],
            "value": torch.tensor([r[3] for r in self.rows], dtype=torch.float64),
            "layers": self.layers,
            "epoch_starts": dict(self.epoch_starts),
            "epoch_arrays": arrays,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__()
        steps, values = state["step"].tolist(), state["value"].tolist()
        for step, layer, stat, value in zip(steps, state["layer"], state["stat"], values):
            self.rows.append((step, layer, stat, value))
            self.by_step.setdefault(step, {})[_key(layer, stat)] = value
        self.layers = {n: dict(d) for n, d in state["layers"].items()}
        self.epoch_starts = {int(e): int(s) for e, s in state["epoch_starts"].items()}
        self.epoch = int(state["epoch"])
        for name, a in state["epoch_arrays"].items():
            for k, vals in a.items():
                self.epoch_arrays[name][k] = [v.numpy() for v in vals]


def folder(monitor: DriftMonitor, trainer: pl.Trainer) -> Path | None:
    """The local artifact folder: ``dirpath``, else ``<default_root_dir>/drift`` when the run
    has an MLflow logger, else ``None`` (nothing is written)."""
    if monitor.dirpath is not None:
        return Path(monitor.dirpath)
    if artifacts.mlflow_target(trainer.loggers) is not None:
        return Path(trainer.default_root_dir) / "drift"
    return None


def write(monitor: DriftMonitor, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The last arrays, ``summary.parquet``, ``meta.json`` and the figures into the local
    folder, then one upload of the folder into the run's ``drift/``."""
    where = folder(monitor, trainer)
    if monitor.arrays:
        monitor.record.end_epoch(where)
    if where is None:
        return
    where.mkdir(parents=True, exist_ok=True)
    table = monitor.table()
    meta = monitor.meta(trainer, pl_module)
    table.to_parquet(where / "summary.parquet", index=False)
    (where / "meta.json").write_text(json.dumps(meta, indent=1, default=float))
    if monitor.figures and len(table):
        from rescalelab.callbacks.drift import figures

        (where / "figures").mkdir(exist_ok=True)
        for name, fig in figures.run_figures(table, meta).items():
            fig.savefig(where / "figures" / f"{name}.png")
            figures.close(fig)
    artifacts.upload(trainer.loggers, where, "drift")
