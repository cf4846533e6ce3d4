"""``rescalelab-report <parent run id | sweep dir>``: build a sweep's report on demand and log it
to the parent run (:mod:`rescalelab.analysis.sweep_report`), then record and print the sweep's
answer (:mod:`rescalelab.analysis.summary`). Also ``python -m rescalelab.analysis.report_cli``.

An existing report folder is kept under ``report-<its time>`` rather than overwritten.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from mlflow import MlflowClient

from rescalelab.analysis.mlflow_read import resolve_target
from rescalelab.analysis.sweep_report import log_report
from rescalelab.analysis.tuneability import TARGET_RATIO


def keep_previous(client: MlflowClient, run_id: str, out: str | None) -> Path | None:
    """Rename an existing report folder (``--out``, else ``<sweep dir>/report``) to
    ``report-<its time>`` so that rebuilding never silently overwrites it; return the new name."""
    sweep_dir = client.get_run(run_id).data.tags.get("rescalelab.sweep_dir")
    folder = Path(out) if out else Path(sweep_dir) / "report" if sweep_dir else None
    if folder is None or not folder.is_dir() or not any(folder.iterdir()):
        return None
    when = datetime.fromtimestamp(folder.stat().st_mtime)
    kept = folder.with_name(f"{folder.name}-{when:%Y%m%d-%H%M%S}")
    folder.rename(kept)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """``rescalelab-report <parent run id | sweep dir> [--tracking-uri URI] [--metric KEY]``."""
    p = argparse.ArgumentParser(
        prog="rescalelab-report",
        description="Build a sweep's report (tables and figures) and log it to its parent run.",
    )
    p.add_argument("target", help="a multirun directory (holds mlflow_parent.json) or a run id")
    p.add_argument(
        "--tracking-uri",
        help="MLflow store (default: the sweep's own; else $MLFLOW_TRACKING_URI, "
        "else sqlite:///$PWD/mlflow.db)",
    )
    p.add_argument("--metric", default="train/loss", help="curve metric (default train/loss)")
    p.add_argument("--out", help="also keep the files here (default: <sweep dir>/report)")
    p.add_argument(
        "--target-ratio",
        type=float,
        default=TARGET_RATIO,
        help="tuneability target as a fraction of the initial loss (default 0.01)",
    )
    args = p.parse_args(argv)
    uri, run_id = resolve_target(args.target, args.tracking_uri)
    try:
        kept = keep_previous(MlflowClient(uri), run_id, args.out)
        if kept is not None:
            print(f"the previous report is kept in {kept}; the run's report/ is replaced")
        report = log_report(
            uri, run_id, metric=args.metric, out_dir=args.out, target_ratio=args.target_ratio
        )
    except Exception as e:  # MlflowException (unknown run), I/O errors: one line, exit 1
        print(
            f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            file=sys.stderr,
        )
        return 1
    print(f"report of {len(report.children)} runs logged to run {run_id} (report/)")
    from rescalelab.analysis.summary import finish_sweep

    finish_sweep(MlflowClient(uri), run_id, report, uri, args.metric)
    print(f"files: {report.out_dir}" if args.out or report.out_dir.exists() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
