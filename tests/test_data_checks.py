"""The DataModules check their own ``data.*`` keys (``errors.checked``), without RULES.

Each ``data=<option>`` class declares the range of every key it takes: a direct call and
``check_targets`` on a composed config (what a run and the sweep preflight do before anything
is built or tracked) raise the same one line, in the words the RULES table used. ``REDUCED``
is RULES without its ``data.*`` rules, so these tests hold before and after they are deleted.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from rescalelab.data import (
    CIFAR10,
    Digits,
    ImageNetSubset,
    LogisticData,
    QuadraticData,
    SyntheticImages,
)
from rescalelab.data.imagenet.prepare import main as prepare_imagenet
from rescalelab.errors import ConfigError
from rescalelab.rules import RULES
from rescalelab.validate import check_targets, constructor_checks, uncovered_keys, validate
from tests.helpers import compose_train

CONF = Path(__file__).resolve().parents[1] / "src" / "rescalelab" / "conf"
OPTIONS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
REDUCED = [r for r in RULES if not r.key.startswith("data.")]
CLASSES = [CIFAR10, Digits, ImageNetSubset, LogisticData, QuadraticData, SyntheticImages]


@functools.cache
def _composed(option: str) -> DictConfig:
    return compose_train(f"data={option}")


def composed(option: str) -> DictConfig:
    """A fresh copy of ``train.yaml`` with ``data=<option>`` (composed once per option)."""
    return copy.deepcopy(_composed(option))


@pytest.mark.parametrize("option", OPTIONS)
def test_every_key_of_every_data_option_is_checked_by_its_class(option):
    cfg = composed(option)
    assert uncovered_keys(cfg, rules=REDUCED) == []
    assert all(not k.startswith("data.") for k in uncovered_keys(cfg, rules=[]))


def test_every_data_option_targets_a_checking_class():
    """An undecorated ``@dataclass`` subclass would get a fresh ``__init__`` that checks
    nothing: every class a ``data=`` option names must reject a bad inherited key itself."""
    targets = {str(composed(o).data._target_).rsplit(".", 1)[-1] for o in OPTIONS}
    assert targets == {c.__name__ for c in CLASSES}
    for cls in CLASSES:
        assert "batch_size" in constructor_checks(cls)
        with pytest.raises(
            ConfigError, match=r"^data.batch_size=0 is invalid: expected an integer > 0$"
        ):
            cls(batch_size=0)


# a direct call: (constructor, keyword arguments, the whole message)
CALLS = [
    (SyntheticImages, {"pixel_noise": -1.0}, "data.pixel_noise=-1.0 is invalid: expected a number >= 0"),
    (SyntheticImages, {"num_train": 0}, "data.num_train=0 is invalid: expected an integer > 0"),
    (CIFAR10, {"mean": (0.5, 0.5)}, "data.mean=(0.5, 0.5) is invalid: expected a list of 3 numbers or null"),
    (CIFAR10, {"root": ""}, "data.root='' is invalid: expected a folder"),
    (CIFAR10, {"crop_padding": -1}, "data.crop_padding=-1 is invalid: expected an integer >= 0"),
    (Digits, {"channels": 2}, "data.channels=2 is invalid: expected 1 or 3"),
    (Digits, {"val_fraction": 1.0}, "data.val_fraction=1.0 is invalid: expected a fraction in (0, 1)"),
    (QuadraticData, {"cond": 0.5}, "data.cond=0.5 is invalid: expected a number >= 1"),
    (QuadraticData, {"label_noise": 0.5},
     "data.label_noise=0.5 is invalid: expected 0 (the targets of a convex problem are not class labels)"),
    (LogisticData, {"lam": 0.0}, "data.lam=0.0 is invalid: expected a number > 0"),
    (ImageNetSubset, {"fraction": 1.5}, "data.fraction=1.5 is invalid: expected a fraction in (0, 1]"),
    (ImageNetSubset, {"check": "full"}, "data.check='full' is invalid: expected one of: decode, header"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"), CALLS, ids=[m.split(" ")[0] for *_, m in CALLS]
)
def test_a_direct_call_with_a_bad_value_raises_one_line(cls, kwargs, message):
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    assert str(e.value) == message


def test_a_direct_call_takes_paths_and_tuples():
    """What a caller passes and a config never holds: ``Path`` folders, tuples of numbers."""
    dm = ImageNetSubset(root=Path("/nowhere"), cache=Path("/nowhere/cache"), classes=("a", "b"))
    assert dm.mean == [0.485, 0.456, 0.406]  # the tuple defaults pass their own check
    assert CIFAR10(root=Path("/nowhere"), std=(0.2, 0.2, 0.2)).root == Path("/nowhere")
    assert LogisticData(cache_dir=Path("/nowhere")).lam == 1e-2


# a composed config: (option, key, bad value, the whole message); a row per data.* key of RULES
TABLE = [
    ("synthetic", "data.batch_size", 0, "data.batch_size=0 is invalid: expected an integer > 0"),
    ("synthetic", "data.num_train", 0, "data.num_train=0 is invalid: expected an integer > 0"),
    ("synthetic", "data.num_val", -1, "data.num_val=-1 is invalid: expected an integer > 0"),
    ("synthetic", "data.num_classes", 1, "data.num_classes=1 is invalid: expected an integer >= 2"),
    ("synthetic", "data.image_size", 4, "data.image_size=4 is invalid: expected an integer >= 8"),
    ("synthetic", "data.channels", 0, "data.channels=0 is invalid: expected an integer >= 1"),
    ("synthetic", "data.field_noise", "loud", "data.field_noise='loud' is invalid: expected a number >= 0"),
    ("synthetic", "data.pixel_noise", -1, "data.pixel_noise=-1 is invalid: expected a number >= 0"),
    ("synthetic", "data.label_noise", 1.5, "data.label_noise=1.5 is invalid: expected a fraction in [0, 1]"),
    ("synthetic", "data.train_eval_size", 0, "data.train_eval_size=0 is invalid: expected null or an integer >= 1"),
    ("synthetic", "data.seed", -1, "data.seed=-1 is invalid: expected an integer >= 0"),
    ("cifar10", "data.root", "", "data.root='' is invalid: expected a folder"),
    ("cifar10", "data.download", 1, "data.download=1 is invalid: expected true or false"),
    ("cifar10", "data.verify", "yes", "data.verify='yes' is invalid: expected true or false"),
    ("cifar10", "data.augment", 2, "data.augment=2 is invalid: expected true or false"),
    ("cifar10", "data.flip", "on", "data.flip='on' is invalid: expected true or false"),
    ("cifar10", "data.crop_padding", -1, "data.crop_padding=-1 is invalid: expected an integer >= 0"),
    ("cifar10", "data.mean", [0.5, 0.5], "data.mean=[0.5, 0.5] is invalid: expected a list of 3 numbers or null"),
    ("cifar10", "data.std", [0.2, 0.2, 0], "data.std=[0.2, 0.2, 0] is invalid: expected a list of 3 numbers > 0 or null"),
    ("cifar10", "data.num_train", 0, "data.num_train=0 is invalid: expected an integer > 0"),
    ("digits", "data.channels", 2, "data.channels=2 is invalid: expected 1 or 3"),
    ("digits", "data.val_fraction", 0, "data.val_fraction=0 is invalid: expected a fraction in (0, 1)"),
    ("quadratic", "data.dim", 0, "data.dim=0 is invalid: expected an integer >= 1"),
    ("quadratic", "data.cond", 0.5, "data.cond=0.5 is invalid: expected a number >= 1"),
    ("quadratic", "data.lam", -1, "data.lam=-1 is invalid: expected a number >= 0"),
    ("quadratic", "data.noise_std", -0.1, "data.noise_std=-0.1 is invalid: expected a number >= 0"),
    ("quadratic", "data.replacement", 1, "data.replacement=1 is invalid: expected true or false"),
    ("quadratic", "data.problem_seed", -1, "data.problem_seed=-1 is invalid: expected an integer >= 0"),
    ("quadratic", "data.noise_estimate", "no", "data.noise_estimate='no' is invalid: expected true or false"),
    ("logistic", "data.lam", 0, "data.lam=0 is invalid: expected a number > 0"),
    ("logistic", "data.weight_scale", 0, "data.weight_scale=0 is invalid: expected a number > 0"),
    ("logistic", "data.cache_dir", "", "data.cache_dir='' is invalid: expected a folder"),
    ("imagenet_subset", "data.fraction", 1.5, "data.fraction=1.5 is invalid: expected a fraction in (0, 1]"),
    ("imagenet_subset", "data.val_fraction", 0, "data.val_fraction=0 is invalid: expected a fraction in (0, 1]"),
    ("imagenet_subset", "data.num_classes", 1, "data.num_classes=1 is invalid: expected an integer >= 2"),
    ("imagenet_subset", "data.classes", ["n01"], "data.classes=['n01'] is invalid: expected a list of at least 2 class folder names, or null"),
    ("imagenet_subset", "data.resize_size", 4, "data.resize_size=4 is invalid: expected an integer >= 8 or null"),
    ("imagenet_subset", "data.cache", "", "data.cache='' is invalid: expected a folder or null"),
    ("imagenet_subset", "data.check", "full", "data.check='full' is invalid: expected one of: decode, header"),
    ("imagenet_subset", "data.skip_corrupt", 1, "data.skip_corrupt=1 is invalid: expected true or false"),
    ("imagenet_subset", "data.num_workers", -1, "data.num_workers=-1 is invalid: expected an integer >= 0"),
    ("imagenet_subset", "data.progress", "maybe", "data.progress='maybe' is invalid: expected true or false"),
]  # fmt: skip


def test_check_targets_reports_every_data_key_without_rules():
    """Every ``data.*`` key of RULES, bad on the config of an option that takes it: the reduced
    rules let it through, ``check_targets`` (before anything is built) names it."""
    rule_keys = {r.key for r in RULES if r.key.startswith("data.")}
    assert rule_keys <= {key for _, key, _, _ in TABLE}  # each moved key has a row
    failures = []
    for option, key, value, message in TABLE:
        cfg = composed(option)
        OmegaConf.update(cfg, key, value)
        validate(cfg, rules=REDUCED)
        try:
            check_targets(cfg)
            failures.append(f"{option} {key}={value!r}: no error")
        except ConfigError as e:
            if str(e) != message:
                failures.append(f"{option} {key}={value!r}: {e}")
    assert not failures, "\n".join(failures)


def test_prepare_imagenet_reports_a_bad_key_without_rules(monkeypatch, capsys):
    """``rescalelab-prepare-imagenet`` validates like a run: with no data.* rule left, the
    DataModule's own check gives the same line and exit status 2."""
    monkeypatch.setattr("rescalelab.validate.RULES", REDUCED)
    assert prepare_imagenet(["data.fraction=2"]) == 2
    err = capsys.readouterr().err
    assert err == "error: data.fraction=2 is invalid: expected a fraction in (0, 1]\n"
