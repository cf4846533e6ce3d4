"""experiment=memorization as a researcher types it, shrunk: two joblib workers of one thread each,
random training labels, train_eval/loss at every epoch end, a report ranked by that eval-mode
training cost with its seed bands (docs/memorization.md)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import all_runs, assert_ok, client, compose_train, history, run_cli

SMALL = ["data.num_train=256", "data.num_val=64", "trainer.max_epochs=2"]


def _report(root: Path, run_id: str, name: str) -> list[dict[str, str]]:
    local = client(root).download_artifacts(run_id, f"report/{name}", str(root))
    with open(local) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("preset", ["memorization", "memorization_knobs"])
def test_memorization_presets_run_two_jobs_at_once(preset):
    # 48 runs fit in about 30 minutes of a 2-core CPU only two at a time, one thread each (joblib
    # gives each of its n_jobs workers cpu_count / n_jobs threads)
    cfg = compose_train(f"experiment={preset}", hydra=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2


def test_memorization_preset_ranks_methods_by_the_eval_mode_training_cost_with_seed_bands(root):
    proc = run_cli(
        root, "-m", "experiment=memorization", "method=sg,whitening", "optim.lr=0.1",
        "seed=0,1,2", *SMALL,
    )  # fmt: skip
    assert_ok(proc)
    runs = all_runs(root, "memorization")
    (parent,) = [r for r in runs if r.data.tags.get("rescalelab.sweep") == "parent"]
    children = [r for r in runs if r is not parent]
    assert len(children) == 6 and {r.info.status for r in children} == {"FINISHED"}
    finals: dict[str, list[float]] = {"sg": [], "whitening": []}
    for run in children:
        params = run.data.params
        assert params["data.label_noise"] == "1.0"  # every training label redrawn
        # an eval-mode pass over the training set at every epoch end, at val/loss's step
        curve = history(root, run.info.run_id, "train_eval/loss")
        assert [s for s, _ in curve] == [s for s, _ in history(root, run.info.run_id, "val/loss")]
        assert len(curve) == 2
        finals[params["method"]].append(curve[-1][1])
    methods = {r["method"]: r for r in _report(root, parent.info.run_id, "methods.csv")}
    assert set(methods) == {"method=sg", "method=whitening"}
    for method, values in finals.items():
        row = methods[f"method={method}"]
        q1, med, q3 = np.quantile(values, [0.25, 0.5, 0.75])
        # the report's number is the median over the 3 seeds of the last train_eval/loss, and its
        # band their quartiles: not train/loss (the train-mode minibatch loss favours BN)
        assert float(row["best_final"]) == pytest.approx(med)
        assert float(row["best_final_q1"]) == pytest.approx(q1)
        assert float(row["best_final_q3"]) == pytest.approx(q3)
        assert row["seeds"] == "3"
    ranked = [r["method"] for r in _report(root, parent.info.run_id, "methods.csv")]
    by_cost = sorted(finals, key=lambda m: float(np.median(finals[m])))
    assert ranked == [f"method={m}" for m in by_cost]
    assert "train_eval/loss" in proc.stdout
