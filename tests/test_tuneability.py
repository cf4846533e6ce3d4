"""Tuneability measures, performance profiles, the QMC budget, the summary: formulas against
values computed by hand (docs/sweeps.md writes each formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from rescalelab.analysis.budget import budget_info, check_space, qmc_points
from rescalelab.analysis.profiles import profile, ratios
from rescalelab.analysis.summary import metric_name, shared_params
from rescalelab.analysis.tuneability import (
    expected_best_after_k,
    median_inf,
    range_share,
    time_to_target,
)
from rescalelab.errors import ConfigError

INF = math.inf


def test_expected_best_after_k_is_the_order_statistic_with_replacement():
    # x = 1, 2, 3: k=1 the mean 2; k=2: 1·(1 − 4/9) + 2·(4/9 − 1/9) + 3·(1/9) = 14/9;
    # k=3: 1·(1 − 8/27) + 2·(8/27 − 1/27) + 3·(1/27) = 36/27.
    e = expected_best_after_k([3.0, 1.0, 2.0])
    assert e.tolist() == pytest.approx([2.0, 14 / 9, 36 / 27])
    assert expected_best_after_k([5.0]).tolist() == [5.0]
    assert expected_best_after_k([]).size == 0
    # A diverged trial: +inf for every k without a cap; the cap (L0) stands for it otherwise.
    assert expected_best_after_k([1.0, INF]).tolist() == [INF, INF]
    assert expected_best_after_k([1.0, INF], cap=3.0).tolist() == pytest.approx([2.0, 1.5])
    # nonincreasing in k, and tends to the best
    e = expected_best_after_k(list(np.linspace(0.1, 2.0, 20)))
    assert np.all(np.diff(e) <= 1e-12) and e[-1] < 0.1 + 0.1


def test_range_share_counts_the_log_lr_cells_of_the_trials_that_reach_the_target():
    # A grid 0.01, 0.1, 1 (one decade apart): cells of 1 decade, the outer ones half a gap
    # beyond the ends: 3 decades; 0.1 and 1 reach: 2 decades, share 2/3.
    assert range_share([0.01, 0.1, 1.0], [0, 1, 1]) == pytest.approx((2.0, 3.0, 2 / 3))
    # With the declared range [0.01, 1] the outer cells end there: 0.5 + 1 of 2 decades.
    assert range_share([0.01, 0.1, 1.0], [0, 1, 1], (0.01, 1.0)) == pytest.approx((1.5, 2.0, 0.75))
    # Unequal gaps: log α = -3, -2, 0; midpoints -2.5 and -1, ends -3.5 and +1 (4.5 decades);
    # cells 1, 1.5, 2: the outer two reach, 3 decades.
    assert range_share([1e-3, 1e-2, 1.0], [1, 0, 1]) == pytest.approx((3.0, 4.5, 3 / 4.5))
    # Two trials at one α: the cell counts by the fraction of them that reach.
    assert range_share([0.1, 0.1, 1.0], [1, 0, 0])[0] == pytest.approx(0.5)
    assert all(math.isnan(v) for v in range_share([0.1], [1]))


def test_time_to_target_is_the_first_epoch_reaching_it_and_its_log_time():
    curve = [(0, 2.0, 1_000.0), (1, 0.5, 3_500.0), (2, 0.1, 6_000.0)]
    assert time_to_target(curve, 500.0, 0.5) == (2, 3.0)  # epoch index 1: the 2nd epoch
    assert time_to_target(curve, 500.0, 0.05) == (INF, INF)
    assert time_to_target([(0, math.nan, 0.0), (1, 0.0, 2000.0)], 0.0, 0.1) == (2, 2.0)
    assert median_inf([3.0, INF, 1.0]) == 3.0 and median_inf([1.0, INF]) == INF
    assert median_inf([1.0, 2.0]) == 1.5 and math.isnan(median_inf([]))


def test_performance_profiles_fraction_of_tasks_within_tau_of_the_best():
    costs = {
        "t1": {"A": 2.0, "B": 4.0},
        "t2": {"A": 6.0, "B": 3.0},
        "t3": {"A": INF, "B": 5.0},
        "t4": {"A": INF, "B": INF},  # solved by nobody: unsolved for all
    }
    r = ratios(costs)
    assert r["t1"] == {"A": 1.0, "B": 2.0} and r["t2"] == {"A": 2.0, "B": 1.0}
    assert r["t3"] == {"A": INF, "B": 1.0} and r["t4"] == {"A": INF, "B": INF}
    rho = profile(costs, [1.0, 1.99, 2.0, 1e9])
    assert rho["A"].tolist() == [0.25, 0.25, 0.5, 0.5]
    assert rho["B"].tolist() == [0.5, 0.5, 0.75, 0.75]


SPACE = {
    "optim.lr": {"low": 1e-4, "high": 10.0, "log": True},
    "optim.momentum": {"low": 0.0, "high": 0.99, "log": False},
}


def test_qmc_points_are_a_seeded_sobol_sequence_inside_the_declared_space():
    pts = qmc_points(SPACE, 8, seed=0)
    assert pts == qmc_points(SPACE, 8, seed=0) and pts != qmc_points(SPACE, 8, seed=1)
    assert qmc_points(SPACE, 5, seed=0) == pts[:5]  # a prefix: 5 trials are the first 5 of 8
    lrs = np.log10([p["optim.lr"] for p in pts])
    moms = [p["optim.momentum"] for p in pts]
    assert lrs.min() >= -4 and lrs.max() <= 1 and min(moms) >= 0 and max(moms) <= 0.99
    # Sobol' balance: each half of the log-lr range (and of the momentum) gets 4 of 8 points
    assert sum(lrs < -1.5) == 4 and sum(np.array(moms) < 0.495) == 4
    with pytest.raises(ConfigError, match=r"hydra.sweeper.space.optim.lr=.* expected low < high"):
        check_space({"optim.lr": {"low": 1.0, "high": 0.1}})
    with pytest.raises(ConfigError, match="low > 0"):
        check_space({"optim.lr": {"low": 0.0, "high": 1.0, "log": True}})
    with pytest.raises(ConfigError, match="hydra.sweeper.trials=0"):
        qmc_points(SPACE, 0, seed=0)


def test_budget_search_mode_composes_the_space_and_is_recorded():
    with initialize_config_module("rescalelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=budget", "paths.root=/tmp/x"],
                      return_hydra_config=True)  # fmt: skip
    info = budget_info(cfg)
    assert info is not None and info["trials"] == 16
    assert set(info["space"]) == {"optim.lr", "optim.momentum", "optim.weight_decay", "optim.eps"}
    assert info["space"]["optim.lr"]["log"] is True and "budget_trial" in info["keys"]
    assert cfg.hydra.sweeper.params.seed == "range(0,3)"  # n_seeds=3, resolved


def test_summary_names_and_the_shared_config():
    assert metric_name({"method": "method=sg"}) == "sg"
    assert metric_name({"method": "norm=bn optim.momentum=0.9", "task": "digits"}) == (
        "digits/bn_0.9"
    )
    kids = [{"a": "1", "b": "2", "seed": "0"}, {"a": "1", "b": "3", "seed": "1"}]
    assert shared_params(kids) == {"a": "1"} and shared_params([]) == {}
