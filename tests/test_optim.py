"""Optimizer families, parameter groups and stepsize schedules (``optim=``, ``schedule=``).

In-process checks build the real objects from the shipped configs and compare every group's
stepsize with the formulas; two CLI runs check what a training run logs (``train/lr`` and
``train/lr/<group>`` per step) under a schedule, with per-layer stepsizes, and the plateau
variant of ``halving`` inside Lightning.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rescalelab.data.convex import LogisticData, QuadraticData
from rescalelab.errors import ConfigError, Expect, checked
from rescalelab.geometry import layer_geometry
from rescalelab.models import SmallCNN
from rescalelab.optim import build_optimizer, build_scheduler
from rescalelab.optim.schedules import SmoothedPlateau, halving
from rescalelab.validate import RULES, check_targets, constructor_checks, uncovered_keys, validate
from tests.helpers import all_runs, assert_ok, compose_train, history, run_cli

FAMILIES = {
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
}


def _optimizer(cfg, model, geometry):
    """What the LightningModule does with the built partials of ``optim`` and ``param_groups``."""
    return build_optimizer(instantiate(cfg.optim), instantiate(cfg.param_groups), model, geometry)


def _scheduler(cfg, opt, **length):
    config = OmegaConf.to_container(cfg.lr_scheduler_config)
    return build_scheduler(instantiate(cfg.schedule), opt, config, **length)


@pytest.fixture(scope="module")
def cnn():
    model = SmallCNN((3, 32, 32), 10)
    return model, layer_geometry(model, (3, 32, 32))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gets_per_layer_stepsizes_and_decay_groups(family, cnn):
    model, geometry = cnn
    cfg = compose_train(
        f"optim={family}", "optim.lr=0.01", "param_groups.layer_scale=fanin",
        "param_groups.decay_exclude=true", "optim.weight_decay=0.001",
    )  # fmt: skip
    validate(cfg)
    check_targets(cfg)
    opt = _optimizer(cfg, model, geometry)
    assert type(opt) is FAMILIES[family]
    groups = {g["name"]: g for g in opt.param_groups}
    assert len(geometry) == 5  # small_cnn: conv1, conv2, fc84, fc16, fc10
    for name, geo in geometry.items():
        decayed, plain = groups[name], groups[f"{name}.no_decay"]
        scale = (geo.share * geo.fanin) ** -0.5
        assert decayed["lr"] == pytest.approx(0.01 * scale) == plain["lr"]
        assert decayed["weight_decay"] == 0.001 and plain["weight_decay"] == 0.0
        layer = dict(model.named_modules())[name]
        assert [p is layer.weight for p in decayed["params"]] == [True]
        assert [p is layer.bias for p in plain["params"]] == [True]
    # one common stepsize and decay on everything with the defaults
    plain_opt = _optimizer(compose_train(f"optim={family}", "optim.lr=0.01"), model, geometry)
    assert {g["lr"] for g in plain_opt.param_groups} == {0.01}
    assert sum(len(g["params"]) for g in plain_opt.param_groups) == len(list(model.parameters()))


def _factor(name: str, k: int, **kw: float) -> float:
    """The schedules' formulas, written out independently."""
    if name == "constant":
        return 1.0
    if name == "halving":
        return 0.5 ** (k // kw["every"])
    if name == "inverse":
        return (kw["gamma"] + 1) / (kw["gamma"] + 1 + k)
    t = min(k, kw["period"]) / kw["period"]
    return kw["min_factor"] + (1 - kw["min_factor"]) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize(
    ("name", "overrides", "kw"),
    [
        ("constant", [], {}),
        ("halving", ["schedule.every=7"], {"every": 7}),
        ("inverse", ["schedule.gamma=9"], {"gamma": 9.0}),
        ("cosine", ["schedule.min_factor=0.1"], {"period": 40, "min_factor": 0.1}),
    ],
)
def test_schedules_multiply_every_groups_stepsize_by_the_same_factor(name, overrides, kw):
    """α_k = base × factor(k) in every group, so per-layer ratios survive any schedule."""
    cfg = compose_train(f"schedule={name}", *overrides)
    validate(cfg)
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.1 * 0.25}])
    sched = _scheduler(cfg, opt, total_steps=40, total_epochs=2)
    assert (sched["interval"], sched["frequency"]) == ("step", 1)  # lr_scheduler_config
    for k in range(60):
        lr0, lr1 = (g["lr"] for g in opt.param_groups)
        assert lr0 == pytest.approx(0.1 * _factor(name, k, **kw), rel=1e-12, abs=1e-15)
        assert lr1 == pytest.approx(0.25 * lr0, rel=1e-12, abs=1e-15)
        opt.step()
        sched["scheduler"].step()


def test_plateau_halving_waits_for_the_smoothed_loss_to_stop_decreasing():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.08}, {"params": [b], "lr": 0.02}])
    sched = SmoothedPlateau(opt, smoothing=0.05, patience=50, threshold=1e-3)
    g = torch.Generator().manual_seed(0)
    noise = lambda: 0.3 * float(torch.randn(1, generator=g))  # noqa: E731
    for k in range(400):  # a noisy but decreasing loss: no halving
        sched.observe(torch.tensor(10.0 / (1 + 0.05 * k) + noise()))
        sched.step()
    assert [gr["lr"] for gr in opt.param_groups] == [0.08, 0.02]
    halved_at = []
    for k in range(600):  # flat and noisy: halve every ~patience steps, both groups alike
        sched.observe(torch.tensor(2.0 + noise()))
        sched.step()
        lr = opt.param_groups[0]["lr"]
        if lr < (halved_at[-1][1] if halved_at else 0.08):
            halved_at.append((k, lr))
    assert len(halved_at) >= 3
    assert all(lr == pytest.approx(0.08 * 0.5 ** (i + 1)) for i, (_, lr) in enumerate(halved_at))
    assert all(k2 - k1 > 50 for (k1, _), (k2, _) in zip(halved_at, halved_at[1:]))
    assert opt.param_groups[1]["lr"] == pytest.approx(opt.param_groups[0]["lr"] / 4)
    sched.observe(torch.tensor(float("nan")))  # a non-finite loss leaves the average alone
    before = sched.smoothed
    sched.step()
    assert sched.smoothed == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["schedule=halving", "schedule.mode=sometimes"], "schedule.mode='sometimes' is invalid"),
        (["optim.nesterov=true"], "optim.nesterov=true is invalid with optim.momentum=0.0"),
        (["schedule=warmup_cosine", "schedule.final_factor=0.1", "param_groups.layer_scale=fanin"],
         "schedule.final_factor=0.1 is invalid with param_groups.layer_scale=fanin"),
        (["param_groups.decay_exclude=1"], "param_groups.decay_exclude=1 is invalid: expected true"),
        (["schedule=inverse", "schedule.gamma=-1"], "schedule.gamma=-1 is invalid"),
        (["schedule=cosine", "schedule.min_factor=2"], "schedule.min_factor=2 is invalid"),
        (["optim=rmsprop", "optim.alpha=1.5"], "optim.alpha=1.5 is invalid"),
        (["optim=adam", "optim.eps=0"], "optim.eps=0 is invalid"),
        (["data=quadratic", "data.cond=0.5"], "data.cond=0.5 is invalid"),
        (["data=quadratic", "data.noise_std=-1"], "data.noise_std=-1 is invalid"),
        (["data=quadratic", "model=linear", "callbacks=theory", "model.bias=true"],
         "model.bias=true is invalid with callbacks=theory"),
        (["callbacks=theory"], "callbacks=theory is invalid with data SyntheticImages"),
        (["data=quadratic", "callbacks=theory"], "callbacks=theory is invalid with model SmallCNN"),
    ],
)  # fmt: skip
def test_bad_optim_schedule_and_problem_values_are_one_line_errors(overrides, message):
    cfg = compose_train(*overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(cfg)
        check_targets(cfg)  # the schedule constructors' own checks, on the config, unbuilt


def test_schedule_constructors_check_their_own_arguments():
    """One place per key: the constructor's declaration checks a call and a config alike."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(
        ConfigError, match=r"^schedule.every=0 is invalid: expected an integer >= 1$"
    ):
        halving(opt, every=0)
    with pytest.raises(ConfigError, match=r"^schedule.mode='later' is invalid: expected one of"):
        halving(opt, mode="later")
    # validate (the rules, torch-free) does not know schedule keys; check_targets does
    cfg = compose_train("schedule=halving", "schedule.every=0")
    validate(cfg)
    with pytest.raises(ConfigError, match=r"^schedule.every=0 is invalid"):
        check_targets(cfg)
    # the constructor's declaration covers its keys for the schema test, with no rule
    assert uncovered_keys(cfg) == []
    assert "schedule.every" not in {r.key for r in RULES}


def test_a_class_declares_its_checks_on_its_init():
    """What data/model/norm constructors can adopt: the check on a call and in check_targets."""

    class Plug:
        @checked("norm", eps=Expect(float, lambda v: v > 0, "a number > 0"))
        def __init__(self, eps: float = 1e-5) -> None:
            self.eps = eps

    with pytest.raises(ConfigError, match=r"^norm.eps=0 is invalid: expected a number > 0$"):
        Plug(eps=0)
    assert Plug(eps=0.1).eps == 0.1
    assert set(constructor_checks(Plug)) == {"eps"}


def test_a_decorated_dataclass_inherits_its_bases_checks():
    """``@checked`` above ``@dataclass``: the generated ``__init__`` checks the class's own keys
    and those of its decorated bases, on a call and in check_targets alike."""

    @checked("data", batch_size=Expect(int, lambda v: v > 0, "an integer > 0"))
    @dataclass(kw_only=True)
    class Base:
        batch_size: int = 8

    @checked("data", size=Expect(int, lambda v: v >= 8, "an integer >= 8"))
    @dataclass(kw_only=True)
    class Child(Base):
        size: int = 32

    with pytest.raises(
        ConfigError, match=r"^data.batch_size=0 is invalid: expected an integer > 0$"
    ):
        Child(batch_size=0)
    with pytest.raises(ConfigError, match=r"^data.size=4 is invalid: expected an integer >= 8$"):
        Child(size=4)
    assert Child(batch_size=2, size=8).size == 8
    assert set(constructor_checks(Child)) == {"batch_size", "size"}
    assert set(constructor_checks(Base)) == {"batch_size"}
    with pytest.raises(TypeError, match="has no parameter"):
        checked("data", colour=Expect(str))(Base)
    with pytest.raises(TypeError, match="are not Expect instances"):
        checked("data", batch_size="an integer")(Base)


def test_a_constructor_that_forwards_keys_declares_them_by_their_checks(tmp_path):
    """``**kwargs`` passed on to another constructor: the declared keys are checked when given,
    and are the only keys ``+key`` may add (norm=bn_warmup forwards Whitening's)."""
    from rescalelab.norm import BnWarmup
    from rescalelab.validate import check_added_keys

    with pytest.raises(ConfigError, match=r"^norm.momentum=0 is invalid: expected a number in"):
        BnWarmup(momentum=0)
    assert BnWarmup(interval=3).whitening.interval == 3
    cfg = compose_train("norm=bn_warmup")
    check_added_keys(cfg, ["+norm.min_active=0.5"])  # forwarded, declared: a key
    with pytest.raises(ConfigError, match=r"^norm.colour is not a key of norm .*eps_mode"):
        check_added_keys(cfg, ["+norm.colour=red"])


class CountingSGD(torch.optim.SGD):
    """torch's SGD that counts its constructions (the "built once" check)."""

    built = 0

    def __init__(self, params, **kwargs):
        type(self).built += 1
        super().__init__(params, **kwargs)


def test_the_optimizer_is_built_once_by_lightning(tmp_path):
    """build_components hands the module partials (no dry-run optimizer); fit builds one."""
    import pytorch_lightning as pl

    from rescalelab.fit import build_components

    cfg = compose_train(
        f"optim._target_={__name__}.CountingSGD", "data.num_train=64", "data.num_val=32",
        "data.batch_size=32", "callbacks=none",
    )  # fmt: skip
    CountingSGD.built = 0
    parts = build_components(cfg)
    assert CountingSGD.built == 0
    module = parts["module"]
    assert isinstance(module.make_optimizer, functools.partial)
    assert module.make_optimizer.func is CountingSGD
    trainer = pl.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=parts["datamodule"])
    assert CountingSGD.built == 1
    assert isinstance(trainer.optimizers[0], CountingSGD)


def test_convex_problem_arguments_are_checked_when_built():
    with pytest.raises(ConfigError, match="data.batch_size=50 is invalid"):
        QuadraticData(num_train=40, batch_size=50)
    with pytest.raises(ConfigError, match="data.lam=0.0 is invalid"):
        LogisticData(lam=0.0)


# -- the CLI: what a run logs ----------------------------------------------------------------------
def test_adam_with_cosine_and_fanin_logs_each_layers_stepsize(root, cnn):
    _, geometry = cnn
    proc = run_cli(
        root, "optim=adam", "optim.lr=0.002", "param_groups.layer_scale=fanin", "schedule=cosine"
    )
    assert_ok(proc)
    (run,) = all_runs(root)
    rid = run.info.run_id
    assert run.data.params["optim._target_"] == "torch.optim.Adam"
    period = 512 // 64  # the whole run: 8 steps
    for name, geo in geometry.items():
        hist = history(root, rid, f"train/lr/{name}")
        assert [k for k, _ in hist] == [1, 3, 5, 7]  # every log_every_n_steps=2
        for k, v in hist:  # the stepsize used at step k
            want = (
                0.002
                * (share_fanin := geo.share * geo.fanin) ** -0.5
                * _factor("cosine", k, period=period, min_factor=0.0)
            )
            assert v == pytest.approx(want, rel=1e-5), (name, share_fanin, k)
    first = next(iter(geometry))
    assert history(root, rid, "train/lr") == history(root, rid, f"train/lr/{first}")


def test_plateau_halving_inside_a_training_run(root):
    proc = run_cli(
        root, "data=quadratic", "model=linear", "data.num_train=1500", "data.num_val=100",
        "optim.lr=0.05", "schedule=halving", "schedule.mode=plateau", "schedule.patience=100",
        "schedule.smoothing=0.05", "trainer.max_epochs=1", "trainer.log_every_n_steps=10",
        "trainer.enable_progress_bar=false",
        "callbacks.guard.max_factor=null",  # one-sample losses: only non-finite ones are alarming
        tiny=False,
    )  # fmt: skip
    assert_ok(proc)
    (run,) = all_runs(root)
    lrs = [v for _, v in history(root, run.info.run_id, "train/lr")]
    assert lrs[0] == pytest.approx(0.05)
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))  # never increases
    halvings = round(math.log2(lrs[0] / lrs[-1]))
    assert halvings >= 1  # the gap plateaus after a few hundred steps at α = 0.05
    assert all(any(v == pytest.approx(0.05 * 0.5**j) for j in range(halvings + 1)) for v in lrs)
