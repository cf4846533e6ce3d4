"""The ``rescalelab-bench`` command line: choose the rows, run them, print the table, write the
JSON report, log it to MLflow (the rows are listed in :mod:`rescalelab.bench`)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import rescalelab.bench
from rescalelab.bench.callback_rows import row_drift, row_stepsizes, row_train_eval
from rescalelab.bench.data import data_rows
from rescalelab.bench.framework_rows import row_framework, row_gpu_variants
from rescalelab.bench.norm_rows import norm_rows, row_baselines
from rescalelab.bench.timing import Comparison, progress
from rescalelab.console import quiet_stack
from rescalelab.tracking.benchmarks import log_benchmark

DEFAULT_ROWS = ["framework", "norm", "drift", "stepsizes", "data", "gpu", "baselines"]


def machine() -> dict[str, str]:
    """What the numbers were measured on (the report's ``machine``, MLflow params)."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(
    quick: bool = False, device: str | None = None, rows: list[str] | None = None
) -> dict[str, Any]:
    """Run the selected rows; return ``{"machine": ..., "rows": [Comparison as dict, ...]}``.

    ``rows=None``: the default rows and ``train_eval``; ``gpu`` runs on a CPU only when named.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    wanted = set(rows or DEFAULT_ROWS)
    if rows is None:
        wanted.add("train_eval")
    if not (device.startswith("cuda") or rows):
        wanted.discard("gpu")
    results: list[Comparison] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # The report's order.
        steps = {
            "norm": lambda: norm_rows(device, quick),
            "baselines": lambda: row_baselines(device, quick),
            "framework": lambda: row_framework(root, device, quick),
            "drift": lambda: [row_drift(root, device, quick)],
            "stepsizes": lambda: [row_stepsizes(root, device, quick)],
            "data": lambda: data_rows(device, quick),
            "train_eval": lambda: [row_train_eval(root, device, quick)],
            "gpu": lambda: [row_gpu_variants(device, quick)],
        }
        for name, rows_of in steps.items():
            if name in wanted:
                results.extend(rows_of())
    return {
        "machine": machine(),
        "device": device,
        "quick": quick,
        "rows": [asdict(r) for r in results],
    }


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (one line per variant)."""
    lines = [
        "| row | variant | median | ratio to base [q25, q75] | target | holds |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        for i, (name, med) in enumerate(r["medians"].items()):
            q = r["ratios"].get(name)
            ratio = f"{q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]" if q else "(base)"
            unit = r["unit"]
            value = f"{med * 1e3:.2f} ms/step" if unit == "s/step" else f"{med:.4g} {unit}"
            holds = "" if r["holds"] is None else ("yes" if r["holds"] else "NO")
            target, holds = (r["target"], holds) if i == 0 else ("", "")
            row = r["row"] if i == 0 else ""
            lines.append(f"| {row} | {name} | {value} | {ratio} | {target} | {holds} |")
        for note in r["notes"]:
            lines.append(f"| | _{note}_ | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``rescalelab-bench [--quick] [--device D] [--rows ...] [--json PATH] [--tracking-uri U]``."""
    doc = rescalelab.bench.__doc__ or ""
    p = argparse.ArgumentParser(prog="rescalelab-bench", description=doc.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true",
        help="a smoke run of every row (its numbers are noise): minutes on a 2-core CPU, more "
        "on a busy one (the progress line shows the time elapsed)",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--rows", nargs="*",
        help="subset of: framework norm drift stepsizes data gpu baselines train_eval",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the report as JSON here ('-': stdout)")
    p.add_argument(
        "--tracking-uri", default=None, help="log to this MLflow store (experiment 'benchmarks')"
    )
    args = p.parse_args(argv)
    torch.manual_seed(0)
    quiet_stack()  # Lightning's and MLflow's per-fit info lines
    report = run(args.quick, args.device, args.rows)
    progress(f"done: {len(report['rows'])} rows")
    print(file=sys.stderr)
    print(table(report))
    if args.json == Path("-"):
        print(json.dumps(report, indent=1))
    elif args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.tracking_uri:
        print("logged to MLflow run", log_benchmark(args.tracking_uri, report))
