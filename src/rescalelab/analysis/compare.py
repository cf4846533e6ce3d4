"""``rescalelab-compare``: one metric across several runs or sweeps, as one table and one figure.

Each target is a run id (that run), a sweep's parent run id or a multirun directory (the sweep's
children), so runs of different sweeps — BN from one, whitening from another — land side by
side. The table (``compare.csv``, ``compare.md``) has one row per run: its source, name, final
and best value of the metric and the step of the best; the figure (``compare.png``) draws the
metric against the step, one colour per source. Both go to ``--out`` and, with ``--log-to RUN``,
to that run's artifacts under ``compare/``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

from rescalelab.analysis.mlflow_read import RUN_ID, child_runs, metric_history, resolve_target
from rescalelab.tracking.store import default_tracking_uri


@dataclass
class Curve:
    """One run's history of the metric, and where it came from."""

    source: str
    uri: str
    run: Run
    steps: list[int]
    values: list[float]

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.run.info.run_id[:8]


def _runs_of(client: MlflowClient, run_id: str) -> tuple[str, list[Run]]:
    """``(source label, runs)``: a parent run's children, or the run itself."""
    run = client.get_run(run_id)
    if run.data.tags.get("rescalelab.sweep") != "parent":
        return run.info.run_name or run_id[:8], [run]
    children = child_runs(client, run)
    label = run.info.run_name or run_id[:8]
    return label, sorted(children, key=lambda r: r.info.start_time or 0)


def collect(targets: Sequence[str], metric: str, tracking_uri: str | None) -> list[Curve]:
    """The curves of every run the targets name (a run without the metric has no curve)."""
    curves = []
    for target in targets:
        if Path(target).is_dir():
            uri, run_id = resolve_target(target, tracking_uri)
        elif RUN_ID.fullmatch(target):
            uri, run_id = tracking_uri or default_tracking_uri(Path.cwd()), target
        else:
            raise SystemExit(f"error: {target!r} is neither a run id nor a multirun directory")
        client = MlflowClient(uri)
        source, runs = _runs_of(client, run_id)
        for run in runs:
            history = metric_history(client, run.info.run_id, metric)
            if history:
                steps = [m.step for m in history]
                curves.append(Curve(source, uri, run, steps, [m.value for m in history]))
    return curves


def table(curves: list[Curve]) -> list[dict[str, object]]:
    rows = []
    for c in curves:
        best = min(range(len(c.values)), key=c.values.__getitem__)
        rows.append({
            "source": c.source, "run": c.name, "run_id": c.run.info.run_id,
            "status": c.run.info.status, "final": c.values[-1], "best": c.values[best],
            "best_step": c.steps[best], "last_step": c.steps[-1],
        })  # fmt: skip
    return rows


def write(curves: list[Curve], metric: str, out: Path) -> list[Path]:
    """``compare.csv``, ``compare.md`` and ``compare.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = table(curves)
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    keys = ["source", "run", "status", "final", "best", "best_step"]
    md = [f"| {' | '.join(keys)} |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])
                             for k in keys) + " |" for r in rows]  # fmt: skip
    (out / "compare.md").write_text("\n".join(md) + "\n")
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(c.source for c in curves))}
    for c in curves:
        ax.plot(c.steps, c.values, color=colours[c.source], alpha=0.8, lw=1.2,
                label=c.name if c.name == c.source else f"{c.source}: {c.name}")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if all(v > 0 for c in curves for v in c.values):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{metric} across {len(colours)} source(s), {len(curves)} run(s)")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)
    plt.close(fig)
    return [out / "compare.csv", out / "compare.md", out / "compare.png"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="rescalelab-compare",
        description="One table and one figure of a metric across runs and sweeps.",
    )
    p.add_argument("targets", nargs="+", help="run ids, sweep parent run ids, multirun dirs")
    p.add_argument("--metric", default="val/loss", help="the metric (default val/loss)")
    p.add_argument("--out", help="folder for the files (default ./compare/<time>)")
    p.add_argument("--tracking-uri", help="MLflow store (default: a sweep dir's own, else "
                   "$MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db)")  # fmt: skip
    p.add_argument("--log-to", metavar="RUN_ID", help="also log the files to this run (compare/)")
    args = p.parse_args(argv)
    try:
        curves = collect(args.targets, args.metric, args.tracking_uri)
    except SystemExit:
        raise
    except Exception as e:  # an unknown run id, an unreachable store: one line
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)  # fmt: skip
        return 1
    if not curves:
        print(f"error: --metric={args.metric}: none of these runs logged it", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("compare") / f"{datetime.now():%Y%m%d-%H%M%S}"
    files = write(curves, args.metric, out)
    print((out / "compare.md").read_text(), end="")
    print(f"files: {out}")
    if args.log_to:
        uri = args.tracking_uri or curves[0].uri  # the store of the first target
        for f in files:
            MlflowClient(uri).log_artifact(args.log_to, str(f), "compare")
        print(f"logged to run {args.log_to} (compare/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
