"""Sweeps through other launchers and sweepers: three joblib workers into a fresh store, Optuna
trials as child runs, the budget search's shared quasi-random trials.

Real CLI subprocesses into real SQLite stores, read back with MlflowClient. (Its own file, apart
from tests/test_sweeps.py, so that pytest-xdist's ``--dist loadfile`` can run the two on two
workers.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import (
    TINY,
    assert_ok,
    child_runs,
    client,
    compose_train,
    history,
    run_cli,
)
from tests.helpers import report_rows as _report_rows
from tests.helpers import sweep_parent as _parent


@pytest.mark.slow
def test_joblib_sweep_with_three_workers_into_a_fresh_store_loses_nothing(tmp_path):
    root = tmp_path  # no mlflow.db yet: the sweep callback creates and migrates it once
    proc = run_cli(
        root, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
        "optim.lr=0.02,0.05,0.1", "seed=0,1",
    )  # fmt: skip
    assert_ok(proc)
    assert "database is locked" not in proc.stdout + proc.stderr
    parent = _parent(root)
    children = child_runs(root)
    assert len(children) == 6 and parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert len({r.info.run_name for r in children}) == 6
    assert {(r.data.params["optim.lr"], r.data.params["seed"]) for r in children} == {
        (lr, s) for lr in ("0.02", "0.05", "0.1") for s in ("0", "1")
    }
    for run in children:
        assert run.info.status == "FINISHED"
        # 512/64 = 8 steps per epoch, 2 epochs, logged every step: every point is there.
        assert [s for s, _ in history(root, run.info.run_id, "train/loss")] == list(range(16))
        assert [s for s, _ in history(root, run.info.run_id, "train/lr")] == list(range(16))
        assert [s for s, _ in history(root, run.info.run_id, "val/loss")] == [7, 15]
    # Several worker processes ran the jobs (the output dirs hold each job's own log).
    assert len(_report_rows(root, parent.info.run_id)) == 6


@pytest.mark.slow
def test_optuna_trials_are_children_and_minimise_the_chosen_metric(root):
    proc = run_cli(
        root,
        "hparams_search=optuna_lr",
        "hydra.sweeper.n_trials=3",
        "optimized_metric=train/loss",
    )  # fmt: skip  (hydra.mode=MULTIRUN in the preset: no -m)
    assert_ok(proc)
    parent = _parent(root)
    children = child_runs(root)
    assert len(children) == 3 and parent.info.status == "FINISHED"
    assert parent.data.tags["rescalelab.sweeper"] == "optuna"
    assert json.loads(parent.data.tags["rescalelab.swept_keys"]) == ["optim.lr"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    lrs = [float(r.data.params["optim.lr"]) for r in children]
    assert all(0.001 <= a <= 1.0 for a in lrs) and len(set(lrs)) == 3
    # The sweeper minimised what the jobs returned: each job's final train/loss.
    results = OmegaConf.load(
        Path(parent.data.tags["rescalelab.sweep_dir"]) / "optimization_results.yaml"
    )
    best = min(children, key=lambda r: r.data.metrics["train/loss"])
    assert results.best_value == pytest.approx(best.data.metrics["train/loss"], rel=1e-6)
    assert results.best_params["optim.lr"] == pytest.approx(float(best.data.params["optim.lr"]))
    files = {a.path for a in client(root).list_artifacts(parent.info.run_id, "report")}
    assert "report/tuning_curves.png" in files
    assert TINY[0] in parent.data.tags["rescalelab.overrides"]


@pytest.mark.slow
def test_budget_search_gives_every_method_the_same_qmc_trials(root):
    from rescalelab.analysis.budget import qmc_points

    proc = run_cli(
        root, "hparams_search=budget", "data=digits", "method=sg,adam", "hydra.sweeper.trials=2",
        "seed=0", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
    )  # fmt: skip
    assert_ok(proc)
    parent = _parent(root)
    cfg = compose_train("hparams_search=budget", hydra=True)
    space = OmegaConf.to_container(cfg.hydra.sweeper.space)
    points = qmc_points(space, 2, seed=0)
    children = child_runs(root)
    assert len(children) == 4
    for run in children:
        p = run.data.params
        point = points[int(p["budget_trial"])]
        assert float(p["optim.lr"]) == point["optim.lr"]
        assert float(p["optim.weight_decay"]) == point["optim.weight_decay"]
        if p["method"] == "sg":  # SGD has momentum and no eps; Adam the other way round
            assert float(p["optim.momentum"]) == point["optim.momentum"] and "optim.eps" not in p
        else:
            assert float(p["optim.eps"]) == point["optim.eps"] and "optim.momentum" not in p
    per_method = sorted((r.data.params["method"], r.data.params["optim.lr"]) for r in children)
    lrs = sorted(str(q["optim.lr"]) for q in points)
    assert per_method == [("adam", a) for a in lrs] + [("sg", a) for a in lrs]
    params = parent.data.params
    assert params["budget.trials"] == "2"
    assert json.loads(params["budget.space.optim.lr"]) == {"low": 1e-4, "high": 10.0, "log": True}
    # per method: E[best after k] from the trials' final values (a diverged trial counts as L0)
    rows = {r["method"]: r for r in _report_rows(root, parent.info.run_id, "methods.csv")}
    kids = _report_rows(root, parent.info.run_id)
    for method in ("sg", "adam"):
        row = rows[f"method={method}"]
        l0 = float(row["initial_loss"])
        finals = sorted(
            l0 if k["rescalelab.status"] == "diverged" else float(k["final_epoch_train/loss"])
            for k in kids if k["method"] == f"method={method}"
        )  # fmt: skip
        assert row["K"] == "2" and row["settings"] == "2"
        assert float(row["expected_best_k1"]) == pytest.approx(sum(finals) / 2)
        assert float(row["expected_best_kK"]) == pytest.approx(0.75 * finals[0] + 0.25 * finals[1])
        assert float(row["range_decades"]) == pytest.approx(5.0)  # the declared 1e-4..10
        assert 0.0 <= float(row["reach_share"]) <= 1.0
    files = {a.path for a in client(root).list_artifacts(parent.info.run_id, "report")}
    assert "report/expected_best.png" in files
