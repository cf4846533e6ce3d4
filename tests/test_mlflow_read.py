"""analysis/'s one MLflow reader, and the theory report reading through it, on a real SQLite store
written by hand with MlflowClient (no training): every child of a parent comes back however
many pages ``search_runs`` needs, in job order; histories come back in step order; the theory
report's numbers follow from the logged gaps by formula.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param

from rescalelab.analysis.child import child_record
from rescalelab.analysis.keys import metric_key
from rescalelab.analysis.mlflow_read import child_runs, metric_history, metric_points
from rescalelab.analysis.theory_report import TheoryAnalysis
from rescalelab.tracking.store import ensure_experiment
from tests.helpers import client, tracking_uri


def _parent(root, name: str = "paging") -> tuple[str, str]:
    exp = ensure_experiment(tracking_uri(root), name)
    run = client(root).create_run(
        exp, run_name=f"{name} sweep", tags={"rescalelab.sweep": "parent"}
    )
    return exp, run.info.run_id


def _child(root, exp: str, parent: str, name: str, **tags: str) -> str:
    tags = {"mlflow.parentRunId": parent, **tags}
    return client(root).create_run(exp, run_name=name, tags=tags).info.run_id


def test_child_runs_follows_every_page_and_keeps_job_order(root):
    c = client(root)
    exp, parent = _parent(root)
    nums = [3, 0, 4, 1, 2]  # created out of job order
    ids = {n: _child(root, exp, parent, f"method=sg seed={n} #{n}") for n in nums}
    c.create_run(exp, run_name="not a child #9")  # same experiment, no parent: left out
    _, other = _parent(root, "other")
    _child(root, c.get_run(other).info.experiment_id, other, "another sweep's child #0")
    flt = f"tags.`mlflow.parentRunId` = '{parent}'"
    first = c.search_runs([exp], filter_string=flt, max_results=2)
    assert len(first) == 2 and first.token  # the store pages: one page is not the sweep
    runs = child_runs(c, parent, page_size=2)
    assert [r.info.run_id for r in runs] == [ids[n] for n in range(5)]
    assert [r.info.run_id for r in child_runs(c, c.get_run(parent))] == [ids[n] for n in range(5)]


def test_histories_in_step_order_and_the_child_record(root):
    c = client(root)
    exp, parent = _parent(root)
    rid = _child(
        root, exp, parent, "optim.lr=0.1 seed=1 #0",
        **{"rescalelab.overrides": "optim.lr=0.1 +seed=1", "rescalelab.status": "diverged"},
    )  # fmt: skip
    c.log_batch(
        rid,
        metrics=[Metric("train/loss", v, 0, s) for s, v in ((5, 0.5), (1, 2.0), (3, 1.0))],
        params=[Param("optim.lr", "0.1"), Param("data.batch_size", "8")],
    )
    assert metric_points(c, rid, "train/loss") == [(1, 2.0), (3, 1.0), (5, 0.5)]
    assert [m.step for m in metric_history(c, rid, "train/loss")] == [1, 3, 5]
    assert metric_points(c, rid, "never/logged") == []
    child = child_record(c.get_run(rid), keys=["optim.lr", "seed"])
    assert (child.swept, child.lr, child.batch_size) == ({"optim.lr": "0.1", "seed": "1"}, 0.1, 8)
    assert child.diverged_by_tag and child.method == "default" and child.setting == "optim.lr=0.1"


def test_metric_key_replaces_what_mlflow_refuses():
    assert metric_key("theory/plateau_ratio_0") == "theory/plateau_ratio_0"
    assert metric_key("digits/norm=bn optim.lr=0.1") == "digits/norm_bn optim.lr_0.1"
    assert metric_key("a,b:(c)") == "a_b__c_"


def _theory_sweep(
    root, gaps: dict[tuple[float, int, int], list[float]], tags: dict | None = None
) -> dict:
    """A theory sweep: one child per (α, n_mb, seed) with ``theory/gap`` at k = 1..len."""
    c = client(root)
    exp, parent = _parent(root, "theory")
    for num, ((lr, b, seed), gap) in enumerate(gaps.items()):
        rid = _child(
            root, exp, parent, f"optim.lr={lr} seed={seed} #{num}", **(tags or {}).get(lr, {})
        )
        metrics = [Metric("theory/gap", v, 0, k) for k, v in enumerate(gap, 1)]
        metrics += [Metric("theory/bound", 2 * v, 0, k) for k, v in enumerate(gap, 1)]
        params = [Param("optim.lr", str(lr)), Param("seed", str(seed))]
        params += [Param("data.batch_size", str(b))]
        c.log_batch(rid, metrics=metrics, params=params)
    swept = ["optim.lr", "data.batch_size", "seed"]
    return {"run_id": parent, "experiment_id": exp, "swept_keys": swept}


def test_theory_fixed_step_plateaus_follow_from_the_logged_gaps(root):
    k = np.arange(1, 11)
    # gap_k = 1/k + α (+ 0.01 seed): the plateau over k >= 5 is mean(1/k) + α + 0.005
    gaps = {(a, 1, s): list(1 / k + a + 0.01 * s) for a in (0.4, 0.2) for s in (0, 1)}
    parent = _theory_sweep(root, gaps)
    summary = TheoryAnalysis("fixed_step", plateau_from=0.5).report(client(root), parent)
    tail = float(np.mean(1 / k[k >= 5]))
    plateau = {row["lr"]: row["plateau"] for row in summary["plateaus"]}
    assert plateau == pytest.approx({0.4: tail + 0.405, 0.2: tail + 0.205})
    (pair,) = summary["pairs"]
    assert pair["ratio"] == pytest.approx((tail + 0.405) / (tail + 0.205))
    assert pair["richardson_error"] == pytest.approx(2 * (tail + 0.205) - (tail + 0.405))
    assert [g["seeds"] for g in summary["configurations"]] == [2, 2]
    c = client(root)
    metrics = c.get_run(parent["run_id"]).data.metrics
    assert metrics["theory/plateau_ratio_0"] == pytest.approx(pair["ratio"])
    files = {a.path for a in c.list_artifacts(parent["run_id"], "theory")}
    assert files == {"theory/gap_vs_k.png", "theory/summary.json", "theory/summary.md"}


def test_theory_divergence_brackets_the_threshold_per_batch_size(root):
    grow = [1.0, 10.0, 1e3, 1e5]  # ends above 10x the first gap: diverged
    shrink = [1.0, 0.5, 0.2, 0.1]
    gaps = {
        (0.1, 1, 0): shrink, (0.2, 1, 0): shrink, (0.4, 1, 0): grow,
        (0.2, 4, 0): shrink, (0.4, 4, 0): shrink, (0.8, 4, 0): shrink,
    }  # fmt: skip
    tags = {0.8: {"rescalelab.status": "diverged"}}  # the guard's tag, whatever the gap
    parent = _theory_sweep(root, gaps, tags)
    summary = TheoryAnalysis("divergence").report(client(root), parent)
    rows = {r["batch_size"]: r for r in summary["thresholds"]}
    assert (rows[1]["largest_converged"], rows[1]["smallest_diverged"]) == (0.2, 0.4)
    assert (rows[4]["largest_converged"], rows[4]["smallest_diverged"]) == (0.4, 0.8)
    metrics = client(root).get_run(parent["run_id"]).data.metrics
    assert metrics["theory/diverged_from_b4"] == 0.8 and metrics["theory/converged_up_to_b1"] == 0.2
    local = client(root).download_artifacts(parent["run_id"], "theory/summary.json", str(root))
    assert json.loads(Path(local).read_text())["thresholds"][0]["runs"] == [
        {"lr": 0.1, "diverged": False}, {"lr": 0.2, "diverged": False},
        {"lr": 0.4, "diverged": True},
    ]  # fmt: skip
    assert summary["two_over_L"] is None  # no data.L logged: no 2/L line
