"""The sweep report: its math in-process, and the report of a real MLflow store built by hand.

The store test writes a sweep whose numbers are chosen so that every reported quantity (final
epoch means, medians over seeds, best stepsize, 2x range and its width, diverged counts) follows
from a formula, then checks what ``log_report`` logged to the parent run.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag

from rescalelab.analysis.child import Child
from rescalelab.analysis.figures import training_panels
from rescalelab.analysis.report_cli import main as report_main
from rescalelab.analysis.sweep_report import log_report
from rescalelab.analysis.sweep_stats import (
    aggregate_curves,
    epoch_curve,
    method_table,
    quartiles,
    range_within,
)
from rescalelab.tracking.store import ensure_experiment
from tests.helpers import cli_env, client, tracking_uri

INF = math.inf


def test_quartiles_treat_diverged_as_worst_and_drop_nan():
    assert quartiles([1.0, 2.0, 3.0, 4.0]) == pytest.approx((1.75, 2.5, 3.25))
    q1, med, q3 = quartiles([1.0, 2.0, INF])
    assert (q1, med, q3) == (pytest.approx(1.5), pytest.approx(2.0), INF)
    assert quartiles([INF, INF]) == (INF, INF, INF)
    assert quartiles([math.nan, 3.0]) == (3.0, 3.0, 3.0)
    assert all(math.isnan(v) for v in quartiles([]))


def test_range_within_two_times_the_best_is_contiguous_on_the_grid():
    lrs = [1.0, 0.01, 0.1, 0.3, 0.03]  # any order
    values = {0.01: 4.0, 0.03: 1.5, 0.1: 1.0, 0.3: 1.9, 1.0: INF}
    best_lr, best, lo, hi, width = range_within(lrs, [values[a] for a in lrs])
    assert (best_lr, best, lo, hi) == (0.1, 1.0, 0.03, 0.3)
    assert width == pytest.approx(math.log10(0.3 / 0.03))
    # A point within 2x that is cut off by a worse one does not widen the range.
    best_lr, best, lo, hi, width = range_within([0.01, 0.1, 1.0], [1.2, 5.0, 1.0])
    assert (best_lr, lo, hi, width) == (1.0, 1.0, 1.0, 0.0)
    assert all(math.isnan(v) for v in range_within([0.1, 1.0], [INF, math.nan]))


def test_epoch_curve_averages_the_logged_steps_of_each_epoch():
    history = [(1, 4.0), (3, 2.0), (5, 1.0), (7, 3.0), (8, 9.0)]
    epochs = [(1, 0.0), (3, 0.0), (5, 1.0), (7, 1.0), (7, 1.0)]  # step 8: after the last known
    curve, unit = epoch_curve(history, epochs)
    assert unit == "epoch"
    assert curve == [(0.0, 3.0), (1.0, pytest.approx((1.0 + 3.0 + 9.0) / 3))]
    raw, unit = epoch_curve(history, [])
    assert unit == "step" and raw == [(1.0, 4.0), (3.0, 2.0), (5.0, 1.0), (7.0, 3.0), (8.0, 9.0)]


def test_aggregate_curves_median_and_band_over_seeds():
    agg = aggregate_curves([[(0, 1.0), (1, 0.5)], [(0, 3.0), (1, math.nan)], [(0, 2.0)]])
    assert agg[0].tolist() == [0.0, 1.5, 2.0, 2.5]
    assert agg[1, 0] == 1.0 and agg[1, 2] == INF  # median of {0.5, diverged}


def _child(method: str, lr: float, seed: int, final: float, tag: str = "") -> Child:
    swept = {"method": method, "optim.lr": str(lr), "seed": str(seed)}
    return Child(f"{method}{lr}{seed}", "n", "FINISHED", tag, swept, lr, 1.0, curve=[(0, final)])


def test_methods_and_panels_group_by_method_config_and_seed():
    kids = [_child("a", lr, s, v + s) for lr, v in ((0.1, 1.0), (1.0, 3.0)) for s in (0, 1, 2)]
    kids += [_child("b", 0.1, 0, 0.7, tag="diverged"), _child("b", 1.0, 0, 0.9)]
    rows = {r["method"]: r for r in method_table(kids)}
    assert rows["method=a"]["best_lr"] == 0.1 and rows["method=a"]["best_final"] == 2.0
    assert rows["method=a"]["lr_hi_2x"] == 1.0  # median 4.0 <= 2 * 2.0
    b = rows["method=b"]
    assert (b["diverged"], b["best_lr"], b["best_final"], b["lr_lo_2x"]) == (1, 1.0, 0.9, 1.0)
    panels = training_panels(kids, list(rows.values()))
    titles = [t for t, _ in panels]
    assert titles == ["each method at its best setting", "method=a", "method=b"]
    (label, curves), *_ = panels[0][1]
    assert label == "method=a α*=0.1" and len(curves) == 3


# The hand-made sweep: final-epoch value F of (method, lr) plus 0.01 x seed; b at lr=1 diverges
# for seed 2 only.
F = {("a", 0.01): 2.0, ("a", 0.1): 1.0, ("a", 1.0): 1.5, ("b", 0.01): 0.5, ("b", 0.1): 3.0,
     ("b", 1.0): 5.0}  # fmt: skip
LRS, SEEDS = (0.01, 0.1, 1.0), (0, 1, 2)


def _make_sweep(root) -> tuple[str, dict[tuple[str, float, int], str]]:
    uri = tracking_uri(root)
    c = client(root)
    exp = ensure_experiment(uri, "report_test")
    swept = ["method", "optim.lr", "seed"]
    parent = c.create_run(
        exp,
        run_name="report_test sweep",
        tags={"rescalelab.sweep": "parent", "rescalelab.swept_keys": json.dumps(swept)},
    ).info.run_id
    ids, now, num = {}, int(time.time() * 1000), 0
    for (method, lr), value in F.items():
        for seed in SEEDS:
            final = value + 0.01 * seed
            diverged = (method, lr, seed) == ("b", 1.0, 2)
            overrides = f"method={method} optim.lr={lr} seed={seed} paths.root={root}"
            run = c.create_run(
                exp,
                run_name=f"method={method} optim.lr={lr} seed={seed} #{num}",
                tags={"mlflow.parentRunId": parent, "rescalelab.overrides": overrides},
                start_time=now - 10_000,  # epoch 0 logged 5 s after the start, epoch 1 10 s
            ).info.run_id
            # Epoch 0 (steps 1, 3): F + 1; epoch 1 (steps 5, 7): F -/+ 0.1, mean F.
            losses = [final + 1, final + 1, final - 0.1, final + 0.1]
            if diverged:
                losses[2:] = [math.nan, math.nan]
            stamps = (now - 5000, now - 5000, now, now)
            metrics = [
                Metric("train/loss", v, ts, s) for v, ts, s in zip(losses, stamps, (1, 3, 5, 7))
            ]
            metrics += [Metric("epoch", e, now, s) for e, s in ((0, 1), (0, 3), (1, 5), (1, 7))]
            metrics += [Metric("val/loss", final + 0.2, now, 7), Metric("val/acc", 0.5, now, 7)]
            c.log_batch(
                run,
                metrics=metrics,
                params=[Param("optim.lr", str(lr)), Param("seed", str(seed))],
                tags=[
                    RunTag("rescalelab.status", "diverged"),
                    RunTag("rescalelab.diverged_step", "5"),
                ]
                if diverged
                else [],
            )
            c.set_terminated(run, "FAILED" if diverged else "FINISHED")
            ids[(method, lr, seed)] = run
            num += 1
    return parent, ids


def _csv(root, run_id: str, path: str) -> list[dict[str, str]]:
    local = client(root).download_artifacts(run_id, path, str(root))
    with open(local) as f:
        return list(csv.DictReader(f))


def test_report_of_a_store_sweep_has_the_tables_figures_and_numbers(root):
    parent, ids = _make_sweep(root)
    report = log_report(tracking_uri(root), parent, target_ratio=0.5)
    c = client(root)
    files = {a.path for a in c.list_artifacts(parent, "report")}
    assert files == {
        "report/children.csv", "report/children.html", "report/methods.csv",
        "report/report.html", "report/training_curves.png", "report/tuning_curves.png",
        "report/expected_best.png",
    }  # fmt: skip
    assert len(report.children) == 18
    for png in ("training_curves.png", "tuning_curves.png"):
        local = c.download_artifacts(parent, f"report/{png}", str(root))
        data = Path(local).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    methods = {r["method"]: r for r in _csv(root, parent, "report/methods.csv")}
    a, b = methods["method=a"], methods["method=b"]
    # median over seeds = F + 0.01; a: best 1.01 at 0.1, and 2.01, 1.51 <= 2.02: 2 decades.
    assert float(a["best_lr"]) == 0.1 and float(a["best_final"]) == pytest.approx(1.01)
    assert (float(a["lr_lo_2x"]), float(a["lr_hi_2x"])) == (0.01, 1.0)
    assert float(a["width_decades_2x"]) == pytest.approx(2.0)
    assert a["diverged"] == "0" and a["runs"] == "9"
    # b: best 0.51 at 0.01; 3.01 > 1.02 cuts the range: width 0; one diverged seed.
    assert float(b["best_lr"]) == 0.01 and float(b["best_final"]) == pytest.approx(0.51)
    assert float(b["width_decades_2x"]) == 0.0 and b["diverged"] == "1"
    # Ranked by the median at the best setting: b (0.51) before a (1.01); n = 3 seeds, IQR.
    assert list(methods) == ["method=b", "method=a"] and a["seeds"] == "3"
    assert (float(a["best_final_q1"]), float(a["best_final_q3"])) == pytest.approx((1.005, 1.015))
    # Tuneability. L0 = median of the 18 first losses F + 1 + 0.01 seed = (2.52 + 3.00)/2;
    # target = 0.5 L0 = 1.38: reached at lr 0.1 by a (epoch 2: F = 1.0x), at 0.01 by b (0.5x).
    assert float(a["initial_loss"]) == pytest.approx(2.76)
    assert float(a["target"]) == pytest.approx(1.38)
    for row in (a, b):  # 1 of 3 one-decade cells (grid 0.01, 0.1, 1: 3 decades with the ends)
        assert float(row["reach_decades"]) == pytest.approx(1.0)
        assert float(row["range_decades"]) == pytest.approx(3.0)
        assert float(row["reach_share"]) == pytest.approx(1 / 3)
        assert float(row["epochs_to_target"]) == 2.0  # the second epoch's mean
        assert float(row["seconds_to_target"]) == pytest.approx(10.0)  # logged 10 s after start
    # E[best after k] per seed over its 3 settings, median over seeds: a: k=1 the mean 1.5 +
    # 0.01 s; k=3: (19 x 1 + 7 x 1.5 + 1 x 2)/27 + 0.01 s. b: the diverged seed-2 trial counts
    # as L0 = 2.76: k=1 means 2.8333 (s=0), 2.8433 (s=1), 2.1 (s=2): median 2.8333.
    assert float(a["expected_best_k1"]) == pytest.approx(1.51)
    assert float(a["expected_best_kK"]) == pytest.approx(31.5 / 27 + 0.01)
    assert float(b["expected_best_k1"]) == pytest.approx(8.5 / 3) and b["K"] == "3"
    (bad,) = [k for k in report.children if k.diverged_x is not None]
    assert bad.run_id == ids[("b", 1.0, 2)] and bad.diverged_x == 1.0  # step 5: epoch 1

    rows = _csv(root, parent, "report/children.csv")
    assert len(rows) == 18
    by_id = {r["run_id"]: r for r in rows}
    row = by_id[ids[("a", 0.1, 2)]]
    assert (row["method"], row["optim.lr"], row["seed"]) == ("method=a", "0.1", "2")
    assert float(row["final_epoch_train/loss"]) == pytest.approx(1.02)
    assert float(row["best_train/loss"]) == pytest.approx(1.02 - 0.1)
    assert float(row["final_val/loss"]) == pytest.approx(1.22)
    bad = by_id[ids[("b", 1.0, 2)]]
    assert (bad["status"], bad["rescalelab.status"]) == ("FAILED", "diverged")
    tags = c.get_run(parent).data.tags
    assert tags["rescalelab.report"] == "report/report.html"
    assert tags["rescalelab.best"] == "method=b optim.lr=0.01: final train/loss 0.5"
    html = Path(c.download_artifacts(parent, "report/report.html", str(root))).read_text()
    assert html.count("data:image/png;base64,") == 3 and "width_decades_2x" in html


def test_report_cli_on_demand_by_run_id_and_bad_targets(root, capsys):
    parent, _ = _make_sweep(root)
    ok = subprocess.run(
        [sys.executable, "-m", "rescalelab.analysis.report_cli", parent,
         "--tracking-uri", tracking_uri(root), "--out", str(root / "rep")],
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "report of 18 runs logged" in ok.stdout
    assert f"sweep parent run {parent}: 18 runs" in ok.stdout
    (line,) = [ln for ln in ok.stdout.splitlines() if "method=a" in ln]
    assert "lr=0.1" in line and "1.01 [1.005, 1.015] (n=3)" in line and "0/9" in line
    assert (
        f"#/experiments/{client(root).get_run(parent).info.experiment_id}/runs/{parent}"
        in ok.stdout
    )
    metrics = client(root).get_run(parent).data.metrics  # per-method results on the parent
    assert metrics["a/best_final"] == pytest.approx(1.01) and metrics["b/diverged"] == 1
    assert (root / "rep" / "tuning_curves.png").exists()
    assert len((root / "rep" / "methods.csv").read_text().splitlines()) == 3
    # Bad targets, in-process (the same main()): one line, non-zero exit.
    with pytest.raises(SystemExit, match="neither a sweep directory nor a run id"):
        report_main(["not-a-run", "--tracking-uri", tracking_uri(root)])
    with pytest.raises(SystemExit, match="has no mlflow_parent.json"):
        report_main([str(root)])
    assert report_main(["0" * 32, "--tracking-uri", tracking_uri(root)]) == 1
    assert capsys.readouterr().err.startswith("error: MlflowException: Run with id=000")


def test_tasks_get_their_own_rows_and_profiles_over_data_options(tmp_path):
    from rescalelab.analysis.figures import plot_profiles
    from rescalelab.analysis.sweep_stats import profile_costs

    def kid(data: str, method: str, values: list[float]) -> Child:
        swept = {"data": data, "method": method, "optim.lr": "0.1"}
        curve = [(float(e), v) for e, v in enumerate(values)]
        stamps = [1000.0 * (e + 1) for e in range(len(values))]
        return Child(f"{data}{method}", "n", "FINISHED", "", swept, 0.1, 1.0, curve=curve,
                     stamps=stamps, start_ms=0.0, first_loss=2.0)  # fmt: skip

    # L0 = 2, target 0.5 x 2 = 1: on t1, a reaches it at epoch 1, b at epoch 3; on t2 only b
    # (epoch 2). Ratios: t1 a 1, b 3; t2 a inf, b 1.
    kids = [kid("t1", "a", [0.9, 0.5, 0.4]), kid("t1", "b", [1.5, 1.2, 1.0]),
            kid("t2", "a", [1.8, 1.7, 1.6]), kid("t2", "b", [1.4, 0.8, 0.7])]  # fmt: skip
    rows = method_table(kids, target_ratio=0.5)
    assert [(r["task"], r["method"]) for r in rows] == [
        ("t1", "method=a"), ("t1", "method=b"), ("t2", "method=b"), ("t2", "method=a"),
    ]  # fmt: skip
    costs = profile_costs(rows)
    assert costs == {"t1": {"method=a": 1.0, "method=b": 3.0},
                     "t2": {"method=b": 2.0, "method=a": INF}}  # fmt: skip
    secs = profile_costs(rows, "seconds_to_target")
    assert secs["t1"] == {"method=a": 1.0, "method=b": 3.0}  # logged 1 s per epoch
    plot_profiles(rows, tmp_path / "profiles.png")
    assert (tmp_path / "profiles.png").read_bytes()[:4] == b"\x89PNG"
