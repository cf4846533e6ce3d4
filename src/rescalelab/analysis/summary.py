"""A sweep's answer: recorded on its parent run and printed when the multirun ends.

At the start (:func:`record_start`) the parent gets the swept keys and their values
(params ``swept_keys``, ``swept.<key>``) and, for an equal tuning budget, the budget and the
space (params ``budget.trials``, ``budget.seed``, ``budget.space.<key>``; tag
``rescalelab.budget``). At the end (:func:`record_results`) it gets the config every child
shares (the params whose value is the same in every child) and, per method, the report's
numbers as metrics ``<method>/best_final``, ``…/epochs_to_target`` (so the MLflow runs table
shows the results on the parent row); :func:`print_summary` prints the answer with rich.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from rich.console import Console
from rich.table import Table

from rescalelab.analysis.budget import budget_info
from rescalelab.analysis.keys import metric_key

UI_URL = "http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
# methods.csv columns recorded as parent metrics, per method
METRIC_COLUMNS = (
    "best_final", "best_final_q1", "best_final_q3", "best_lr", "best_val_acc", "diverged",
    "seeds", "expected_best_k1", "expected_best_kK", "reach_decades", "reach_share",
    "epochs_to_target", "seconds_to_target", "width_decades_2x",
)  # fmt: skip


def _batch_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    items = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def record_start(
    client: MlflowClient,
    run_id: str,
    config: Any,
    swept: Sequence[str],
    values: Mapping[str, str],
) -> dict[str, Any] | None:
    """Swept keys and values, and the tuning budget, on the parent; returns the budget."""
    params = {"swept_keys": ",".join(swept)}
    params.update({f"swept.{k}": str(v) for k, v in values.items() if k in swept})
    budget = budget_info(config)
    tags = []
    if budget:
        params["budget.trials"] = str(budget["trials"])
        params["budget.seed"] = str(budget["seed"])
        for key, dim in budget["space"].items():
            params[f"budget.space.{key}"] = json.dumps(dim)
        tags.append(RunTag("rescalelab.budget", json.dumps(budget)))
    _batch_params(client, run_id, params)
    if tags:
        client.log_batch(run_id, tags=tags)
    return budget


def shared_params(children: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The params whose value is the same in every child (the sweep's shared config)."""
    if not children:
        return {}
    first = dict(children[0])
    return {k: v for k, v in first.items() if all(c.get(k) == v for c in children[1:])}


def metric_name(row: Mapping[str, object]) -> str:
    """``sg`` for ``method=sg``; ``digits/sg`` with tasks; MLflow's allowed characters only."""
    label = str(row["method"])
    short = "_".join(part.split("=", 1)[-1] for part in label.split()) or "default"
    if row.get("task"):
        short = f"{row['task']}/{short}"
    return metric_key(short)


def record_results(client: MlflowClient, run_id: str, report: Any) -> None:
    """Shared config as params, per-method results as metrics, on the parent run."""
    children = [client.get_run(c.run_id).data.params for c in report.children]
    existing = client.get_run(run_id).data.params
    shared = {k: v for k, v in shared_params(children).items() if k not in existing}
    _batch_params(client, run_id, shared)
    metrics = []
    for row in report.methods:
        name = metric_name(row)
        for col in METRIC_COLUMNS:
            value = float(row.get(col, math.nan))  # type: ignore[arg-type]
            if math.isfinite(value):  # an unreached target (inf) is left out
                metrics.append(Metric(f"{name}/{col}", value, 0, 0))
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])


def _g(value: object, fmt: str = ".3g") -> str:
    v = float(value)  # type: ignore[arg-type]
    return "–" if math.isnan(v) else ("∞" if math.isinf(v) else format(v, fmt))


def _setting(row: Mapping[str, object]) -> str:
    """The best setting, ``lr=0.05`` when nothing tuned was swept."""
    setting = str(row["best_setting"]).replace("optim.", "")
    lr = float(row["best_lr"])  # type: ignore[arg-type]
    return f"lr={lr:g}" if setting == "default" and math.isfinite(lr) else setting


def summary_table(report: Any, metric: str = "train/loss") -> Table:
    """Method, best setting, median F* [IQR] (n), best val acc, diverged, tuneability."""
    table = Table(
        title="ranked by the median final value at the best setting", title_justify="left"
    )
    for col in ("method", "best setting", f"final {metric} median [IQR] (n)", "best val acc",
                "diverged", "E\\[best] k=1→K", "reaches target", "to target"):  # fmt: skip
        table.add_column(col, overflow="fold")
    for row in report.methods:
        name = f"{row['task']}: {row['method']}" if row.get("task") else str(row["method"])
        share = row["reach_share"]
        reach = (f"{_g(row['reach_decades'], '.2f')} of {_g(row['range_decades'], '.2f')} dec"
                 if not math.isnan(float(share)) else "–")  # type: ignore[arg-type]  # fmt: skip
        table.add_row(
            name,
            _setting(row),
            f"{_g(row['best_final'], '.4g')} [{_g(row['best_final_q1'], '.4g')}, "
            f"{_g(row['best_final_q3'], '.4g')}] (n={row['seeds']})",
            _g(row["best_val_acc"]),
            f"{row['diverged']}/{row['runs']}",
            f"{_g(row['expected_best_k1'])} → {_g(row['expected_best_kK'])} (K={row['K']})",
            reach,
            f"{_g(row['epochs_to_target'])} ep / {_g(row['seconds_to_target'])} s",
        )
    return table


def print_summary(
    report: Any,
    tracking_uri: str,
    parent_run_id: str,
    experiment_id: str,
    metric: str = "train/loss",
    console: Console | None = None,
) -> None:
    """The answer of the sweep on the console: parent id, table, report path, how to browse."""
    console = console or Console(width=160)
    console.print(f"[bold]sweep parent run {parent_run_id}[/]: {len(report.children)} runs")
    if report.children:
        console.print(summary_table(report, metric))
    target = report.methods[0]["target"] if report.methods else math.nan
    console.print(f"target = {_g(target)} (see docs/sweeps.md: tuneability)", soft_wrap=True)
    console.print(f"report: {report.out_dir / 'report.html'} (and report/ of the parent run)",
                  soft_wrap=True)  # fmt: skip
    console.print(f"browse: mlflow ui --backend-store-uri {tracking_uri}", soft_wrap=True)
    console.print(
        "        " + UI_URL.format(experiment_id=experiment_id, run_id=parent_run_id),
        soft_wrap=True,
    )


def finish_sweep(
    client: MlflowClient, run_id: str, report: Any, tracking_uri: str, metric: str
) -> None:
    """What a multirun's end adds to the sweep report: parent params and metrics, the summary."""
    record_results(client, run_id, report)
    experiment_id = client.get_run(run_id).info.experiment_id
    print_summary(report, tracking_uri, run_id, experiment_id, metric)
