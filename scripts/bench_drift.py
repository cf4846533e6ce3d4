"""Overhead of ``callbacks=drift`` at its default schedule, side by side in one process.

Each round trains the same configuration twice, once with the default callbacks and once with
``callbacks=drift`` (real MLflow runs in a throw-away SQLite store), alternating which goes first
(A B, B A, A B, ...), after one warm-up pair. Reported:

* ``step_ratio``: median over rounds of (training time with drift) / (without), training time
  being on_train_start → on_train_end (every step, epoch ends, the asynchronous MLflow writes
  that run meanwhile; no validation). The acceptance target is ``step_ratio <= 1.03``.
* ``cpu_ratio``: the same with the process's CPU time (all its threads) instead of wall time:
  what the callback costs in work, little affected by other processes on a shared machine.
* ``within_run``: time beyond steps x median plain-step interval, with drift minus without
  (median over rounds): neighbouring steps compared, so a loaded machine's slow drifts cancel.
* ``end_of_fit_s``: what the callback adds once after training (summary table, figures, the
  artifact upload), median over rounds.
* ``instrumented_steps``, ``probes``: how much the schedule did.

    .venv/bin/python scripts/bench_drift.py                     # small_cnn, default experiment size
    .venv/bin/python scripts/bench_drift.py --norm bn --epochs 3 --rounds 5 --json out.json

``measure(...)`` returns the same numbers as a dict.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _fit(root: Path, overrides: list[str], tag: str) -> dict[str, float]:
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from rescalelab.bench.fits import fit_config
    from rescalelab.callbacks.drift import DriftMonitor
    from rescalelab.fit import build_components
    from rescalelab.tracking import TrackedRun

    class Clock(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.starts: list[float] = []
            self.t0 = time.perf_counter()
            self.c0 = time.process_time()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            self.cpu = time.process_time() - self.c0
            self.t_end = time.perf_counter()
            self.seconds = self.t_end - self.t0
            self.steps = trainer.global_step

    out = root / f"{tag}-{time.monotonic_ns()}"
    cfg = fit_config(root, out, ["trainer.enable_progress_bar=false", *overrides])
    parts = build_components(cfg)
    clock = Clock()
    run = TrackedRun.start(
        cfg, tracking_uri=cfg.logger.tracking_uri, experiment_name="bench-drift",
        overrides=overrides, output_dir=str(out),
    )  # fmt: skip
    trainer = instantiate(cfg.trainer, callbacks=[*parts["callbacks"], clock], logger=run.logger())
    trainer.fit(parts["module"], datamodule=parts["datamodule"])
    done = time.perf_counter()
    run.end("FINISHED")
    # Step intervals (batch start to next batch start: everything the loop does per step).
    ticks = [*clock.starts, clock.t_end]
    intervals = [b - a for a, b in zip(ticks, ticks[1:])]
    result: dict[str, Any] = {
        "seconds": clock.seconds, "cpu_seconds": clock.cpu, "steps": clock.steps,
        "end_of_fit_s": done - clock.t_end,
        "intervals": intervals, "instrumented": [],
    }  # fmt: skip
    for cb in parts["callbacks"]:
        if isinstance(cb, DriftMonitor):
            result["instrumented"] = sorted(cb.by_step)
            result["probes"] = cb.n_probes
    return result


def _excess(run: dict[str, Any]) -> float:
    """Time beyond (steps x the median step interval of the run's plain steps), as a fraction:
    a within-run overhead estimate that slow drifts of a loaded machine do not bias."""
    marked = set(run["instrumented"])
    plain = [t for i, t in enumerate(run["intervals"]) if i not in marked]
    med = statistics.median(plain)
    return sum(run["intervals"]) / (len(run["intervals"]) * med) - 1


def measure(
    norm: str = "none",
    epochs: int = 2,
    num_train: int = 10000,
    batch_size: int = 128,
    rounds: int = 3,
    extra: list[str] | None = None,
    root: Path | None = None,
    drift_extra: list[str] | None = None,
) -> dict[str, Any]:
    """Interleaved A/B fits; the numbers described in the module docstring."""
    import torch

    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
    base = [
        "model=small_cnn", f"norm={norm}", f"trainer.max_epochs={epochs}",
        f"data.num_train={num_train}", "data.num_val=256", f"data.batch_size={batch_size}",
        *(extra or []),
    ]  # fmt: skip
    variants = {
        "default": [*base, "callbacks=default"],
        "drift": [*base, "callbacks=drift", *(drift_extra or [])],
    }
    for name, ov in variants.items():  # warm-up pair: imports, allocator, store
        _fit(root, [*ov, "trainer.max_epochs=1", "data.num_train=2048"], f"warm-{name}")
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name].append(_fit(root, variants[name], name))
    pairs = list(zip(samples["drift"], samples["default"]))
    ratios = [d["seconds"] / a["seconds"] for d, a in pairs]
    cpu = [d["cpu_seconds"] / a["cpu_seconds"] for d, a in pairs]
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    qc = statistics.quantiles(cpu, n=4, method="inclusive") if len(cpu) > 1 else cpu * 3
    drift = samples["drift"]
    within = [_excess(d) - _excess(a) for d, a in zip(samples["drift"], samples["default"])]
    report = {
        "config": {
            "norm": norm,
            "epochs": epochs,
            "num_train": num_train,
            "batch_size": batch_size,
            "rounds": rounds,
            "extra": extra or [],
            "drift_extra": drift_extra or [],
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },  # fmt: skip
        "steps": drift[0]["steps"],
        "seconds_per_step": {
            k: statistics.median(s["seconds"] / s["steps"] for s in v) for k, v in samples.items()
        },
        "step_ratio": {"q25": q[0], "median": statistics.median(ratios), "q75": q[-1]},
        "cpu_ratio": {"q25": qc[0], "median": statistics.median(cpu), "q75": qc[-1]},
        "within_run": statistics.median(within),
        "end_of_fit_s": {
            k: statistics.median(s["end_of_fit_s"] for s in v) for k, v in samples.items()
        },
        "instrumented_steps": len(drift[0]["instrumented"]),
        "probes": drift[0]["probes"],
        "ratios": ratios,
        "cpu_ratios": cpu,
        "within_run_rounds": within,
    }
    report["target"] = "step_ratio median <= 1.03"
    report["holds"] = report["step_ratio"]["median"] <= 1.03
    if tmp is not None:
        tmp.cleanup()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--norm", default="none", help="norm option (none, bn, whitening, ...)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--num-train", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument(
        "--drift", nargs="*", default=[], help="overrides for the drift variant only, e.g. "
        "callbacks.drift.probe_size=0",
    )  # fmt: skip
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both variants")
    a = p.parse_args(argv)
    import logging

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    for name in ("pytorch_lightning", "lightning.pytorch", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    report = measure(
        a.norm, a.epochs, a.num_train, a.batch_size, a.rounds, a.overrides, drift_extra=a.drift
    )
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text)
    r, c = report["step_ratio"], report["cpu_ratio"]
    print(
        f"drift/default step time: {r['median']:.3f} [{r['q25']:.3f}, {r['q75']:.3f}], "
        f"CPU time: {c['median']:.3f} [{c['q25']:.3f}, {c['q75']:.3f}] "
        f"(within-run excess {report['within_run']:+.1%}; "
        f"{report['instrumented_steps']} of {report['steps']} steps instrumented, "
        f"{report['probes']} probes) -> target <= 1.03 {'holds' if report['holds'] else 'MISSED'}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
