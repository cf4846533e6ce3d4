"""The norm and model constructors check their own keys (``errors.checked``), without RULES.

Each key is checked in one place, its constructor: a direct call with a bad value is the same
one-line ConfigError as the config, and ``check_targets`` applies the declaration to the composed
config before anything is built. The rules of RULES for ``norm.*`` and ``model.*`` are left out
here, so these tests hold once the table no longer has them.
"""

from __future__ import annotations

import re

import pytest

from rescalelab.errors import ConfigError
from rescalelab.models import AlexNet, LinearModel, ResNet20
from rescalelab.norm import (
    BatchNorm,
    BatchRenormPlug,
    BnWarmup,
    GroupNorm,
    LayerNorm,
    WeightNorm,
    Whitening,
)
from rescalelab.norm.batch_renorm import BatchRenorm
from rescalelab.rules import RULES
from rescalelab.validate import CONF_DIR, check_targets, uncovered_keys, validate
from tests.helpers import compose_train

OWN = ("norm.", "model.")
OTHER_RULES = [r for r in RULES if not r.key.startswith(OWN)]
OPTIONS = [
    f"{group}={p.stem}"
    for group in ("norm", "model")
    for p in sorted((CONF_DIR / group).glob("*.yaml"))
]
IMAGE = ((3, 32, 32), 10)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_key_of_every_norm_and_model_option_is_its_constructors(option):
    """Without any norm.*/model.* rule, the constructors' declarations cover every key."""
    cfg = compose_train(option)
    assert uncovered_keys(cfg, rules=OTHER_RULES) == []


# (constructor call, its one-line message): one row per key moved out of RULES, its words verbatim
CALLS = [
    (lambda: BatchNorm(momentum=0.0), "norm.momentum=0.0 is invalid: expected a number in (0, 1]"),
    (lambda: BatchNorm(eps=0), "norm.eps=0 is invalid: expected a number > 0"),
    (lambda: BatchNorm(sync="yes"), "norm.sync='yes' is invalid: expected true or false"),
    (lambda: Whitening(interval=0), "norm.interval=0 is invalid: expected an integer >= 1"),
    (lambda: Whitening(init_batches=0), "norm.init_batches=0 is invalid: expected an integer >= 1"),
    (lambda: Whitening(eps_mode="batch"),
     "norm.eps_mode='batch' is invalid: expected one of: absolute, relative"),
    (lambda: Whitening(max_scale=0.5), "norm.max_scale=0.5 is invalid: expected null or a number >= 1"),
    (lambda: Whitening(min_active=1.5),
     "norm.min_active=1.5 is invalid: expected null or a fraction in (0, 1]"),
    (lambda: BnWarmup(warmup_epochs=-1), "norm.warmup_epochs=-1 is invalid: expected an integer >= 0"),
    (lambda: BnWarmup(lr_after_switch=0),
     "norm.lr_after_switch=0 is invalid: expected a number > 0 or null"),
    (lambda: BnWarmup(momentum=1.5), "norm.momentum=1.5 is invalid: expected a number in (0, 1]"),
    (lambda: GroupNorm(groups=0), "norm.groups=0 is invalid: expected an integer >= 1"),
    (lambda: LayerNorm(eps=-1.0), "norm.eps=-1.0 is invalid: expected a number > 0"),
    (lambda: WeightNorm(mean_only_bn=1), "norm.mean_only_bn=1 is invalid: expected true or false"),
    (lambda: BatchRenormPlug(r_max=0.5), "norm.r_max=0.5 is invalid: expected a number >= 1"),
    (lambda: BatchRenormPlug(d_max=-1), "norm.d_max=-1 is invalid: expected a number >= 0"),
    (lambda: BatchRenormPlug(relax_start=-1),
     "norm.relax_start=-1 is invalid: expected an integer >= 0"),
    (lambda: BatchRenormPlug(r_relax_steps=2.5),
     "norm.r_relax_steps=2.5 is invalid: expected an integer >= 0"),
    (lambda: BatchRenorm(4, d_relax_steps=-3),  # the module alone: its Relaxation checks
     "norm.d_relax_steps=-3 is invalid: expected an integer >= 0"),
    (lambda: AlexNet(*IMAGE, dropout=1.0), "model.dropout=1.0 is invalid: expected a number in [0, 1)"),
    (lambda: AlexNet(*IMAGE, pool_size=0), "model.pool_size=0 is invalid: expected an integer >= 1"),
    (lambda: LinearModel((4,), 1, bias="no"), "model.bias='no' is invalid: expected true or false"),
    (lambda: LinearModel((4,), 1, init="ones"),
     "model.init='ones' is invalid: expected one of: zeros, default"),
    (lambda: ResNet20(*IMAGE, blocks=0), "model.blocks=0 is invalid: expected an integer >= 1"),
    (lambda: ResNet20(*IMAGE, width=True), "model.width=True is invalid: expected an integer >= 1"),
    (lambda: ResNet20(*IMAGE, shortcut="conv"),
     "model.shortcut='conv' is invalid: expected one of: projection, pad"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "message"), CALLS, ids=[m.split(" ")[0] for _, m in CALLS])
def test_a_direct_constructor_call_with_a_bad_value_is_one_line(call, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        call()


def test_good_values_still_build():
    """The declarations pass the defaults and the values of the presets (ints as numbers)."""
    assert BnWarmup(warmup_epochs=0, lr_after_switch=1, max_scale=10).whitening.max_scale == 10
    plug = BatchRenormPlug(r_max=1, d_max=0, relax_start=0, r_relax_steps=0, d_relax_steps=0)
    assert (plug.relaxation.r_max, plug.relaxation.d_relax_steps) == (1, 0)
    assert GroupNorm(groups=1, eps=1).groups == 1
    assert ResNet20(*IMAGE, blocks=1, width=1, shortcut="pad").fc.in_features == 4
    assert AlexNet(*IMAGE, dropout=0, pool_size=1).avgpool.output_size == (1, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["norm=bn", "norm.momentum=0"], "norm.momentum=0 is invalid: expected a number in (0, 1]"),
        (["norm=whitening", "norm.interval=0"], "norm.interval=0 is invalid"),
        (["norm=bn_warmup", "norm.init_batches=0"], "norm.init_batches=0 is invalid"),
        (["norm=bn_warmup", "norm.warmup_epochs=-1"], "norm.warmup_epochs=-1 is invalid"),
        (["norm=batch_renorm", "norm.relax_start=-5"], "norm.relax_start=-5 is invalid"),
        (["norm=groupnorm", "norm.groups=0"], "norm.groups=0 is invalid"),
        (["norm=weightnorm", "norm.mean_only_bn=2"], "norm.mean_only_bn=2 is invalid"),
        (["model=alexnet", "model.dropout=1.5"], "model.dropout=1.5 is invalid"),
        (["model=resnet20", "model.shortcut=conv"], "model.shortcut='conv' is invalid"),
        (["data=quadratic", "model=linear", "model.init=ones"], "model.init='ones' is invalid"),
    ],
)  # fmt: skip
def test_check_targets_finds_a_bad_norm_or_model_value_without_rules(overrides, message):
    """The composed config passes the table without its norm/model rules; the constructors'
    declarations, applied to the unbuilt config nodes, raise the one line."""
    cfg = compose_train(*overrides)
    validate(cfg, rules=OTHER_RULES)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        check_targets(cfg)
