"""The callbacks check their own config keys (``errors.checked`` on each class): a direct call,
and a composed config through ``check_targets`` before anything is built, give the one line
that the rules gave; no rule of ``RULES`` is needed for a key one of our callbacks owns."""

from __future__ import annotations

from pathlib import Path

import pytest

from rescalelab.callbacks.bn_warmup import BNWarmupMonitor
from rescalelab.callbacks.checkpoint import LastCheckpoint
from rescalelab.callbacks.drift import DriftMonitor
from rescalelab.callbacks.guard import DivergenceGuard
from rescalelab.callbacks.progress import ProgressBar
from rescalelab.callbacks.stepsizes import StepsizeMonitor
from rescalelab.callbacks.theory import TheoryCallback
from rescalelab.callbacks.train_eval import TrainEval
from rescalelab.errors import ConfigError
from rescalelab.rules import RULES
from rescalelab.validate import check_targets, uncovered_keys, validate
from tests.helpers import compose_train

CONF = Path(__file__).resolve().parents[1] / "src" / "rescalelab" / "conf" / "callbacks"
# The keys of Lightning's own ModelCheckpoint (callbacks.checkpoint): no constructor of ours
# owns them, so they stay in RULES (the wildcards also cover callbacks.last.dirpath/filename).
KEPT = {
    "callbacks.*.dirpath",
    "callbacks.*.filename",
    "callbacks.*.enable_version_counter",
    "callbacks.checkpoint.monitor",
    "callbacks.checkpoint.mode",
    "callbacks.checkpoint.save_top_k",
    "callbacks.checkpoint.save_last",
}
WITHOUT_CALLBACK_RULES = [r for r in RULES if not r.key.startswith("callbacks.") or r.key in KEPT]
OPTIONS = sorted(p.stem for p in CONF.glob("*.yaml"))

# (constructor call, the one line it raises): one per group, the rule's words
BAD_CALLS = [
    (lambda: DriftMonitor(probe_size=-1), "callbacks.drift.probe_size=-1 is invalid: expected an integer >= 0 or null"),
    (lambda: DriftMonitor(metrics="some"), "callbacks.drift.metrics='some' is invalid: expected one of: compact, all"),
    (lambda: DriftMonitor(track_bn="yes"), "callbacks.drift.track_bn='yes' is invalid: expected true or false"),
    (lambda: DriftMonitor(eps=None), "callbacks.drift.eps=None is invalid: expected a number > 0"),
    (lambda: BNWarmupMonitor(extra_steps=0), "callbacks.bn_warmup.extra_steps=0 is invalid: expected an integer >= 1"),
    (lambda: BNWarmupMonitor(window=None), "callbacks.bn_warmup.window=None is invalid: expected an integer >= 1"),
    (lambda: DivergenceGuard(max_factor=1), "callbacks.guard.max_factor=1 is invalid: expected a number > 1 or null"),
    (lambda: DivergenceGuard(check_every_n_steps=True), "callbacks.guard.check_every_n_steps=True is invalid: expected an integer >= 1"),
    (lambda: LastCheckpoint("ckpt", flush_timeout=-1), "callbacks.last.flush_timeout=-1 is invalid: expected a number >= 0"),
    (lambda: LastCheckpoint("ckpt", filename="a/b"), "callbacks.last.filename='a/b' is invalid: expected a file name"),
    (lambda: LastCheckpoint("ckpt", every_n_train_steps=0), "callbacks.last.every_n_train_steps=0 is invalid: expected an integer >= 1 or null"),
    (lambda: ProgressBar(refresh_rate=-1), "callbacks.progress.refresh_rate=-1 is invalid: expected an integer >= 0"),
    (lambda: StepsizeMonitor(var_threshold=0), "callbacks.stepsizes.var_threshold=0 is invalid: expected a number > 0"),
    (lambda: StepsizeMonitor(per_step=1), "callbacks.stepsizes.per_step=1 is invalid: expected true or false"),
    (lambda: TheoryCallback(per_decade=-1), "callbacks.theory.per_decade=-1 is invalid: expected an integer >= 0"),
    (lambda: TrainEval(every_n_epochs=1.5), "callbacks.train_eval.every_n_epochs=1.5 is invalid: expected an integer >= 1"),
]  # fmt: skip


@pytest.mark.parametrize("option", OPTIONS)
def test_every_callback_key_is_checked_without_the_callback_rules(option):
    cfg = compose_train(f"callbacks={option}")
    assert uncovered_keys(cfg, rules=WITHOUT_CALLBACK_RULES) == []


@pytest.mark.parametrize(("call", "line"), BAD_CALLS, ids=[m.split(" ")[0] for _, m in BAD_CALLS])
def test_a_direct_call_with_a_bad_value_raises_one_line(call, line):
    with pytest.raises(ConfigError) as info:
        call()
    assert str(info.value) == line


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["callbacks=drift", "callbacks.drift.probe_epochs=-1"], "callbacks.drift.probe_epochs=-1 is invalid: expected an integer >= 0"),
        (["callbacks=bn_warmup", "callbacks.bn_warmup.window=0"], "callbacks.bn_warmup.window=0 is invalid: expected an integer >= 1"),
        (["callbacks.guard.check_every_n_steps=0"], "callbacks.guard.check_every_n_steps=0 is invalid: expected an integer >= 1"),
        (["callbacks.last.on_signal=maybe"], "callbacks.last.on_signal='maybe' is invalid: expected true or false"),
        (["callbacks.progress.refresh_rate=-2"], "callbacks.progress.refresh_rate=-2 is invalid: expected an integer >= 0"),
        (["callbacks=stepsizes", "callbacks.stepsizes.var_threshold=-1"], "callbacks.stepsizes.var_threshold=-1 is invalid: expected a number > 0"),
        (["callbacks=theory", "data=quadratic", "model=linear", "model.bias=false", "callbacks.theory.every_n_steps=0"], "callbacks.theory.every_n_steps=0 is invalid: expected an integer >= 1"),
        (["callbacks=train_eval", "callbacks.train_eval.every_n_epochs=0"], "callbacks.train_eval.every_n_epochs=0 is invalid: expected an integer >= 1"),
        # null where it means nothing (errors.required): refused before anything is built
        (["callbacks=train_eval", "callbacks.train_eval.every_n_epochs=null"], "callbacks.train_eval.every_n_epochs=None is invalid: expected an integer >= 1"),
        (["callbacks=drift", "callbacks.drift.metrics=null"], "callbacks.drift.metrics=None is invalid: expected one of: compact, all"),
    ],
    ids=lambda v: v[-1].split("=")[0] if isinstance(v, list) else "",
)  # fmt: skip
def test_check_targets_reports_a_bad_override_that_no_rule_checks(overrides, line):
    cfg = compose_train(*overrides)
    validate(cfg, rules=WITHOUT_CALLBACK_RULES)  # the rules no longer know the key
    with pytest.raises(ConfigError) as info:
        check_targets(cfg)
    assert str(info.value) == line


def test_good_values_and_meaningful_nulls_pass():
    DriftMonitor(every_n_steps=None, probe_size=None, probe_batch_size=None, dirpath=None)
    assert DivergenceGuard(max_factor=None).max_factor is None
    assert LastCheckpoint("ckpt", every_n_train_steps=None).every is None
    assert TheoryCallback(per_decade=None).per_decade == 0  # null: off
    assert TrainEval(every_n_epochs=3).every_n_epochs == 3
    check_targets(compose_train("callbacks=bn_warmup"))
