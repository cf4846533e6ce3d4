"""Checks on the composed config that run before anything is built or tracked.

Hydra already rejects unknown options and overrides of keys that do not exist. What Hydra
cannot check is checked in one place per key:

* a constructor of rescalelab checks its own arguments (:func:`rescalelab.errors.checked`:
  the data modules, models, norm plugs, callbacks, schedules and ``param_groups``);
  :func:`check_targets` applies those checks to the config's nodes before anything is built
  (the job, before it builds; the sweep's preflight, for every job);
* :data:`~rescalelab.rules.RULES` (rules.py, the table) holds the keys that no constructor of
  ours owns (torch's optimizers, Lightning's Trainer and ModelCheckpoint, paths, logger, the
  top-level keys); :func:`validate` applies them, with the cross-key checks, without importing
  torch, so the command line's answer to those comes in about a second (preflight.py);
* keys *added* with ``+`` (:func:`check_added_keys`).

:func:`uncovered_keys` lists keys that neither a rule nor their constructor checks, and a test
keeps that list empty. Each failure is a :class:`ConfigError` whose one-line message names the
key, the value and what is allowed. Rules apply when the key exists, so a group option without
a key simply has nothing to check; ``null`` passes (it means "default" or "off" wherever an
option allows it) except where a constructor's check is :func:`~rescalelab.errors.required`.
A rule key may hold ``*`` wildcards (``callbacks.*.dirpath``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from rescalelab.errors import ConfigError, Expect, check
from rescalelab.errors import type_ok as _type_ok
from rescalelab.rules import RULES, Rule

# Structural keys: checked by instantiate itself ("Error locating target ...").
STRUCTURAL = ("_target_", "*._target_", "_partial_", "*._partial_")


def leaves(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, object]]:
    """``(dotted key, value)`` of every leaf; values that do not resolve here are left out."""
    for k in cfg:
        key = f"{prefix}{k}"
        try:
            child = cfg[k]
        except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra app, ??? values
            continue
        if isinstance(child, DictConfig):
            yield from leaves(child, key + ".")
        else:
            yield key, child


def validate(cfg: DictConfig, rules: list[Rule] | None = None) -> None:
    """Apply every rule whose key exists in ``cfg``; raise on the first violation."""
    flat: dict[str, object] | None = None
    for rule in rules if rules is not None else RULES:
        if "*" in rule.key:
            flat = dict(leaves(cfg)) if flat is None else flat
            found = [(k, v) for k, v in flat.items() if fnmatchcase(k, rule.key)]
        else:
            found = [
                (rule.key, OmegaConf.select(cfg, rule.key, default=None, throw_on_missing=False))
            ]
        for key, value in found:
            if value is not None and not isinstance(value, DictConfig):
                check(key, value, rule.expect)
    check_global_batch(cfg)
    check_warmup(cfg)
    check_schedule_warmup(cfg)
    check_optimizer_combinations(cfg)
    check_theory(cfg)


def targets(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, DictConfig, object]]:
    """``(dotted key, node, object)`` of every node whose ``_target_`` imports here."""
    for k in cfg:
        try:
            child = cfg[k]
        except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra app, ??? values
            continue
        if not isinstance(child, DictConfig) or k == "hydra":
            continue
        obj = _target(child.get("_target_"))
        if obj is not None:
            yield f"{prefix}{k}", child, obj
        yield from targets(child, f"{prefix}{k}.")


def _target(target: object) -> object | None:
    """The object a ``_target_`` names; ``None`` if none (instantiate reports an unknown one)."""
    if target is None:
        return None
    try:
        return get_object(str(target))
    except Exception:  # noqa: BLE001 - any import failure: instantiate reports it itself
        return None


def constructor_checks(obj: object) -> dict[str, Expect]:
    """The argument checks a constructor declared with :func:`rescalelab.errors.checked`: on a
    function, or on a class's ``__init__``."""
    own = getattr(obj, "config_checks", None)
    if own is None and isinstance(obj, type):
        own = getattr(obj.__init__, "config_checks", None)
    return dict(own or {})


def check_targets(cfg: DictConfig) -> None:
    """Apply each constructor's own argument checks to its config node, without building it.

    Imports the targets (torch, for the optimizer side): run by the job before it builds, and
    by the sweep's check of every job (preflight.py), not by the command line's first check.
    """
    for key, node, obj in targets(cfg):
        for name, expect in constructor_checks(obj).items():
            if name not in node:
                continue  # the constructor's default
            value = node.get(name)
            if not isinstance(value, DictConfig):
                check(f"{key}.{name}", value, expect)


def check_optimizer_combinations(cfg: DictConfig) -> None:
    """Combinations the optimizer side would reject only when built, at the start of training:
    Nesterov momentum without momentum (torch's SGD), and a cosine floor ``final_factor > 0``
    with per-layer stepsizes (one ``eta_min`` for all groups in torch's CosineAnnealingLR)."""
    nesterov = OmegaConf.select(cfg, "optim.nesterov", default=None, throw_on_missing=False)
    momentum = OmegaConf.select(cfg, "optim.momentum", default=None, throw_on_missing=False)
    if nesterov is True and _type_ok(momentum, float) and momentum <= 0:  # Muon has its own
        raise ConfigError(
            f"optim.nesterov=true is invalid with optim.momentum={momentum}: expected momentum > 0"
        )
    final = OmegaConf.select(cfg, "schedule.final_factor", default=None, throw_on_missing=False)
    scale = OmegaConf.select(cfg, "param_groups.layer_scale", default=None)
    if _type_ok(final, float) and final > 0 and scale == "fanin":
        raise ConfigError(
            f"schedule.final_factor={final!r} is invalid with param_groups.layer_scale=fanin: "
            "expected 0, since torch's CosineAnnealingLR has one eta_min for all groups"
        )


def check_schedule_warmup(cfg: DictConfig) -> None:
    """``schedule.warmup_epochs`` must leave cosine epochs in a run of ``trainer.max_epochs``."""
    warmup = OmegaConf.select(cfg, "schedule.warmup_epochs", default=None)
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    if not _type_ok(warmup, float) or not _type_ok(epochs, int) or max_steps not in (-1, None):
        return  # a bad warm-up value itself is the schedule constructor's to report
    if warmup >= epochs:
        raise ConfigError(
            f"schedule.warmup_epochs={warmup!r} is invalid with trainer.max_epochs={epochs}: "
            "expected fewer warm-up epochs than the run has"
        )


def check_theory(cfg: DictConfig) -> None:
    """``callbacks=theory`` needs a problem with known F*, L, c, M (``data=quadratic|logistic``)
    and ``model=linear`` without bias (its weights are exactly the w of F(w))."""
    if OmegaConf.select(cfg, "callbacks.theory", default=None, throw_on_missing=False) is None:
        return
    data = str(OmegaConf.select(cfg, "data._target_", default="?")).rsplit(".", 1)[-1]
    if data not in ("QuadraticData", "LogisticData"):
        raise ConfigError(
            f"callbacks=theory is invalid with data {data}: expected data=quadratic or data=logistic"
        )
    model = str(OmegaConf.select(cfg, "model._target_", default="?")).rsplit(".", 1)[-1]
    if model != "LinearModel":
        raise ConfigError(f"callbacks=theory is invalid with model {model}: expected model=linear")
    if OmegaConf.select(cfg, "model.bias", default=False):
        raise ConfigError("model.bias=true is invalid with callbacks=theory: expected false")


def check_warmup(cfg: DictConfig) -> None:
    """``norm.warmup_epochs`` (BN epochs before whitening) must leave whitened epochs to train."""
    warmup = OmegaConf.select(cfg, "norm.warmup_epochs", default=None, throw_on_missing=False)
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None, throw_on_missing=False)
    if _type_ok(warmup, int) and _type_ok(epochs, int) and epochs > 0 and warmup >= epochs:
        raise ConfigError(
            f"norm.warmup_epochs={warmup} is invalid: expected < trainer.max_epochs={epochs}"
        )


def check_global_batch(cfg: DictConfig, devices: object = None) -> None:
    """``data.batch_size`` is the global batch: it must split evenly over the W ranks, where
    W = ``trainer.devices`` x ``trainer.num_nodes`` (``devices`` overrides a non-integer setting)."""
    devices = OmegaConf.select(cfg, "trainer.devices") if devices is None else devices
    nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
    batch = OmegaConf.select(cfg, "data.batch_size")
    if not (
        _type_ok(devices, int) and devices > 0 and _type_ok(nodes, int) and _type_ok(batch, int)
    ):
        return  # "auto", device lists: resolved (and checked again) at launch
    if batch % (devices * nodes):
        raise ConfigError(
            f"data.batch_size={batch} is invalid: the global batch must divide across "
            f"{devices * nodes} ranks (trainer.devices={devices} x trainer.num_nodes={nodes})"
        )


def check_num_classes(cfg: DictConfig, num_classes: int) -> None:
    """An explicit ``model.num_classes`` must equal the class count of the data (which is what
    the model is built with): raise a one-line :class:`ConfigError` before training if not."""
    wanted = OmegaConf.select(cfg, "model.num_classes", default=None, throw_on_missing=False)
    if wanted is not None and wanted != num_classes:
        data = str(OmegaConf.select(cfg, "data._target_", default="?")).rsplit(".", 1)[-1]
        raise ConfigError(
            f"model.num_classes={wanted!r} is invalid: the data ({data}) has {num_classes} classes"
        )


def uncovered_keys(cfg: DictConfig, rules: list[Rule] | None = None) -> list[str]:
    """Leaf keys of ``cfg`` that no rule, no constructor's own check and no structural pattern
    covers."""
    patterns = [r.key for r in (rules if rules is not None else RULES)] + list(STRUCTURAL)
    patterns += [
        f"{key}.{name}" for key, _, obj in targets(cfg) for name in constructor_checks(obj)
    ]
    return [
        k
        for k, v in leaves(cfg)
        if not any(fnmatchcase(k, p) for p in patterns)
        and not (v is None and k.startswith("callbacks.") and k.count(".") == 1)  # dropped
    ]


CONF_DIR = Path(__file__).parent / "conf"


def check_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """A key added on the command line (``+optim.nesterov=true``) must mean something.

    Hydra refuses to *override* a key that does not exist, but ``+`` adds any key. At the top
    level only config groups may be added (``+experiment=...``); inside a node with a
    ``_target_`` the key must be a parameter of that target (a target taking ``**kwargs`` is
    checked when it is built). Raise one line naming the key and the allowed ones.
    """
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if "@" in key or "/" in key or key.rsplit(".", 1)[-1].startswith("_"):
            continue  # group selections with a package, _target_/_partial_
        parent, _, name = key.rpartition(".")
        if not parent:
            if (CONF_DIR / key).is_dir():
                continue
            known = sorted(k for k in cfg if k != key and not isinstance(cfg[k], DictConfig))
            raise ConfigError(
                f"{key} is not a config key: expected a config group or one of: {', '.join(known)}"
            )
        node = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False)
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if target is None:
            continue
        allowed = _target_params(str(target))
        if allowed is None:  # not importable here, or takes **kwargs
            continue
        if name not in allowed:
            raise ConfigError(
                f"{key} is not a key of {parent} ({target}): expected one of: "
                f"{', '.join(sorted(allowed))}"
            )


def _target_params(target: str) -> set[str] | None:
    """Keyword parameters of ``target`` (a class or a function), ``None`` if it takes any: with
    ``**kwargs``, only the keys its checks declare (:func:`rescalelab.errors.checked`) are
    known, and if it declares none it takes any."""
    try:
        obj = get_object(target)
        params = inspect.signature(obj).parameters.values()
    except Exception:  # noqa: BLE001 - instantiate reports an unknown target itself
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {p.name for p in params if p.kind in kinds and p.name != "self"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        declared = set(constructor_checks(obj))
        return named | declared if declared - named else None
    return named
