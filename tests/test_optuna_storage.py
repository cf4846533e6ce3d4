"""``hparams_search=optuna_lr`` keeps its study in ``<paths.root>/optuna.db``: the same command
again continues the study (its earlier trials stay and inform the sampler), another experiment
gets a study of its own."""

from __future__ import annotations

import optuna
import pytest

from tests.helpers import assert_ok, child_runs, run_cli


def _studies(root) -> dict[str, list[optuna.trial.FrozenTrial]]:
    storage = f"sqlite:///{root}/optuna.db"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    return {n: optuna.load_study(study_name=n, storage=storage).trials for n in names}


@pytest.mark.slow
def test_a_second_optuna_sweep_continues_the_stored_study(root):
    sweep = ["hparams_search=optuna_lr", "hydra.callbacks.mlflow_sweep.report=false"]
    assert_ok(run_cli(root, *sweep, "hydra.sweeper.n_trials=2"))
    (name, first), *others = _studies(root).items()
    assert not others and len(first) == 2
    assert name == "optuna_lr[" + ",".join(
        ["data.batch_size=64", "data.num_train=512", "data.num_val=128", "hparams_search=optuna_lr",
         "trainer.log_every_n_steps=2", "trainer.max_epochs=1"]
    ) + "]"  # fmt: skip

    # The same command (another paths.root would be another store): the study goes on.
    assert_ok(run_cli(root, *sweep, "hydra.sweeper.n_trials=1"))
    (trials,) = _studies(root).values()
    assert len(trials) == 3
    assert [t.params for t in trials[:2]] == [t.params for t in first]  # the earlier trials
    assert [t.value for t in trials[:2]] == [t.value for t in first]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert trials[2].params != trials[0].params and trials[2].params != trials[1].params
    # Each trial is a finished child run whose val/loss is the trial's value.
    runs = {float(r.data.params["optim.lr"]): r for r in child_runs(root)}
    assert len(runs) == 3
    for t in trials:
        (lr,) = t.params.values()
        run = min(runs.items(), key=lambda kv: abs(kv[0] - lr))[1]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["val/loss"] == pytest.approx(t.value, rel=1e-6)

    # Another experiment: a study of its own, the first one untouched.
    assert_ok(run_cli(root, *sweep, "hydra.sweeper.n_trials=1", "optim.momentum=0.5"))
    studies = _studies(root)
    assert len(studies) == 2 and len(studies[name]) == 3
