"""Checks on the composed config that run before anything is built or tracked.

Hydra already rejects unknown options and overrides of keys that do not exist. What Hydra
cannot check is checked in one place per key:

* a constructor of rescalelab checks its own arguments (:func:`rescalelab.errors.checked`);
  :func:`check_targets` applies those checks to the config's nodes before anything is built;
* :data:`RULES` holds the keys that no such constructor owns (trainer, paths, logger, torch's
  optimizers, which do not speak this contract: ``lr=inf`` passes torch) and the keys of
  constructors that do not use :func:`~rescalelab.errors.checked` yet (data, model, norm,
  callbacks); :func:`validate` applies them, with the cross-key checks, without importing
  torch, so the command line's answer comes in about a second (preflight.py);
* keys *added* with ``+`` (:func:`check_added_keys`).

:func:`uncovered_keys` lists keys that neither a rule nor their constructor checks, and a test
keeps that list empty. Each failure is a :class:`ConfigError` whose one-line message names the
key, the value and what is allowed. Rules apply when the key exists, so a group option without
a key simply has nothing to check; ``null`` always passes (it means "default" or "off"
wherever an option allows it). A rule key may hold ``*`` wildcards (``callbacks.*.dirpath``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from rescalelab.errors import ConfigError, Expect, check
from rescalelab.errors import type_ok as _type_ok


@dataclass(frozen=True)
class Rule:
    key: str
    kind: type | tuple[type, ...]  # int, float, bool, str, list, or a tuple of them
    ok: Callable[[object], bool] = lambda v: True
    allowed: str = ""


def at_least(key: str, low: int, allowed: str = "") -> Rule:
    """An integer >= ``low``."""
    return Rule(key, int, lambda v: v >= low, allowed or f"an integer >= {low}")


def number_at_least(key: str, low: float) -> Rule:
    """A finite number >= ``low``."""
    return Rule(key, float, lambda v: v >= low, f"a number >= {low}")


def above(key: str, low: float) -> Rule:
    """A finite number > ``low``."""
    return Rule(key, float, lambda v: v > low, f"a number > {low}")


def flag(key: str) -> Rule:
    return Rule(key, bool, allowed="true or false")


PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64")


def _is_uri(value: object) -> bool:
    text = str(value)
    return "://" in text or text.startswith(("databricks", "file:"))


def _batches_or_fraction(value: object) -> bool:
    if isinstance(value, float):
        return 0.0 <= value <= 1.0
    return isinstance(value, int) and value >= 0


def _numbers(value: object, n: int, ok: Callable[[float], bool]) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(_type_ok(x, float) and ok(x) for x in value)  # type: ignore[arg-type]
    )


RULES: list[Rule] = [
    # numpy and pl.seed_everything take 32-bit seeds
    Rule("seed", int, lambda v: 0 <= v <= 2**32 - 1, "an integer in [0, 4294967295]"),
    above("optim.lr", 0),
    Rule("optim.momentum", float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    number_at_least("optim.weight_decay", 0),
    Rule("data.batch_size", int, lambda v: v > 0, "an integer > 0"),
    Rule("data.num_train", int, lambda v: v > 0, "an integer > 0"),
    Rule("data.num_val", int, lambda v: v > 0, "an integer > 0"),
    Rule("data.fraction", float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    Rule("data.val_fraction", float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    at_least("data.image_size", 8),
    at_least("data.num_workers", 0),
    at_least("data.crop_padding", 0),
    Rule("model.dropout", float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    Rule("norm.momentum", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    above("norm.eps", 0),
    at_least("norm.interval", 1),
    at_least("norm.init_batches", 1),
    at_least("norm.warmup_epochs", 0),
    Rule(
        "norm.eps_mode", str, lambda v: v in ("absolute", "relative"), "one of: absolute, relative"
    ),
    Rule("norm.max_scale", float, lambda v: v >= 1, "null or a number >= 1"),
    Rule("norm.min_active", float, lambda v: 0 < v <= 1, "null or a fraction in (0, 1]"),
    at_least("data.train_eval_size", 1, "null or an integer >= 1"),
    Rule("norm.lr_after_switch", float, lambda v: v > 0, "a number > 0 or null"),
    at_least("trainer.max_epochs", 1),
    # Lightning's lr_scheduler_config: a plain dict, no constructor of ours checks it
    Rule(
        "lr_scheduler_config.interval", str, lambda v: v in ("step", "epoch"), "one of: step, epoch"
    ),
    at_least("lr_scheduler_config.frequency", 1),
    Rule("logger.system_metrics", float, lambda v: v > 0, "null or a number of seconds > 0"),
    at_least("n_seeds", 1, "an integer >= 1 (seeds 0..n_seeds-1 of a preset)"),
    at_least("budget_trial", 0, "an integer >= 0 (set by hparams_search=budget)"),
    at_least("trainer.log_every_n_steps", 1),
    at_least("trainer.num_nodes", 1),
    Rule("optim.alpha", float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    above("optim.eps", 0),
    number_at_least("optim.lr_decay", 0),
    at_least("data.dim", 1),
    Rule("data.cond", float, lambda v: v >= 1, "a number >= 1"),
    number_at_least("data.lam", 0),
    number_at_least("data.noise_std", 0),
    Rule("data.label_noise", float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    at_least("callbacks.theory.every_n_steps", 1),
    at_least("callbacks.train_eval.every_n_epochs", 1),
    Rule(
        "runner",
        str,
        lambda v: False,
        "a node with a _target_ (e.g. experiment=theory_diminishing) or null",
    ),
    at_least("runner.runs", 1),
    at_least("runner.every_n_steps", 1),
    at_least("runner.per_decade", 0),
    # -- the rest of the schema: every key of every option has a rule (see uncovered_keys) ----
    flag("resume"),
    Rule("optimized_metric", str, lambda v: bool(v), "a logged metric such as val/loss"),
    Rule("ckpt_path", str, lambda v: bool(v), "a checkpoint file or null"),
    Rule("paths.*", str, lambda v: bool(v), "a path"),
    Rule("logger.experiment_name", str, lambda v: bool(v.strip()), "a non-empty name"),
    Rule(
        "logger.tracking_uri", str, _is_uri, "a URI such as sqlite:///<file>.db or http://host:port"
    ),
    flag("logger.log_model"),
    at_least("data.seed", 0),
    at_least("data.problem_seed", 0),
    at_least("data.num_classes", 2),
    at_least("data.channels", 1),
    number_at_least("data.field_noise", 0),
    number_at_least("data.pixel_noise", 0),
    above("data.weight_scale", 0),
    at_least("data.resize_size", 8, "an integer >= 8 or null"),
    Rule("data.root", str, lambda v: bool(v), "a folder"),
    Rule("data.cache", str, lambda v: bool(v), "a folder or null"),
    Rule("data.cache_dir", str, lambda v: bool(v), "a folder"),
    Rule("data.check", str, lambda v: v in ("decode", "header"), "one of: decode, header"),
    Rule(
        "data.classes",
        list,
        lambda v: len(v) >= 2 and all(isinstance(c, str) for c in v),
        "a list of at least 2 class folder names, or null",
    ),
    Rule(
        "data.mean", list, lambda v: _numbers(v, 3, lambda x: True), "a list of 3 numbers or null"
    ),
    Rule(
        "data.std",
        list,
        lambda v: _numbers(v, 3, lambda x: x > 0),
        "a list of 3 numbers > 0 or null",
    ),
    *[
        Rule(f"data.{k}", bool, allowed="true or false")
        for k in (
            "augment",
            "flip",
            "download",
            "verify",
            "noise_estimate",
            "replacement",
            "skip_corrupt",
            "progress",
        )
    ],
    flag("model.bias"),
    Rule("model.init", str, lambda v: v in ("zeros", "default"), "one of: zeros, default"),
    at_least("model.pool_size", 1),
    flag("norm.sync"),
    Rule(
        "optim.betas",
        list,
        lambda v: _numbers(v, 2, lambda x: 0 <= x < 1),
        "a list of 2 numbers in [0, 1)",
    ),
    number_at_least("optim.initial_accumulator_value", 0),
    Rule(
        "trainer.accelerator",
        str,
        lambda v: v in ("cpu", "gpu", "cuda", "mps", "auto"),
        "one of: cpu, gpu, cuda, mps, auto",
    ),
    Rule(
        "trainer.devices",
        (int, str, list),
        lambda v: (v >= 1 or v == -1) if isinstance(v, int) else v == "auto" or isinstance(v, list),
        "an integer >= 1, -1, auto, or a list of device indices",
    ),
    Rule(
        "trainer.deterministic",
        (bool, str),
        lambda v: v in (True, False, "warn"),
        "true, false or warn",
    ),
    at_least("trainer.num_sanity_val_steps", -1),
    at_least("trainer.max_steps", -1),
    *[
        Rule(f"trainer.{k}", (int, float), _batches_or_fraction, "an integer >= 0 or a fraction")
        for k in ("limit_train_batches", "limit_val_batches", "val_check_interval")
    ],
    Rule(
        "trainer.precision",
        (str, int),
        lambda v: str(v) in PRECISIONS,
        f"one of: {', '.join(PRECISIONS)}",
    ),
    Rule("trainer.default_root_dir", str, lambda v: bool(v), "a folder"),
    Rule("trainer.strategy", str, lambda v: bool(v), "a Lightning strategy name"),
    Rule(
        "trainer.strategy.process_group_backend",
        str,
        lambda v: v in ("gloo", "nccl", "mpi"),
        "one of: gloo, nccl, mpi",
    ),
    Rule(
        "trainer.strategy.start_method",
        str,
        lambda v: v in ("spawn", "fork", "forkserver", "popen"),
        "one of: spawn, fork, forkserver, popen",
    ),
    *[
        Rule(f"trainer.{k}", bool, allowed="true or false")
        for k in (
            "benchmark",
            "channels_last",
            "enable_model_summary",
            "enable_progress_bar",
            "sync_norm",
            "enable_checkpointing",
        )
    ],
    Rule("callbacks.*.dirpath", str, lambda v: bool(v), "a folder"),
    Rule("callbacks.*.filename", str, lambda v: bool(v) and "/" not in v, "a file name"),
    at_least("callbacks.progress.refresh_rate", 0),
    Rule(
        "callbacks.checkpoint.monitor", str, lambda v: bool(v), "a logged metric such as val/loss"
    ),
    Rule("callbacks.checkpoint.mode", str, lambda v: v in ("min", "max"), "one of: min, max"),
    at_least("callbacks.checkpoint.save_top_k", -1),
    Rule(
        "callbacks.checkpoint.save_last",
        (bool, str),
        lambda v: v in (True, False, "link"),
        "true, false or link",
    ),
    flag("callbacks.*.enable_version_counter"),
    at_least("callbacks.last.every_n_train_steps", 1, "an integer >= 1 or null"),
    flag("callbacks.last.on_signal"),
    number_at_least("callbacks.last.flush_timeout", 0),
    Rule("callbacks.guard.max_factor", float, lambda v: v > 1, "a number > 1 or null"),
    at_least("callbacks.guard.check_every_n_steps", 1),
    at_least("callbacks.theory.per_decade", 0),
    at_least("callbacks.drift.dense_steps", 0),
    Rule("callbacks.drift.metrics", str, lambda v: v in ("compact", "all"), "one of: compact, all"),
    at_least("callbacks.bn_warmup.window", 1),
    above("callbacks.stepsizes.var_threshold", 0),
    flag("callbacks.stepsizes.per_step"),
    at_least("callbacks.bn_warmup.extra_steps", 1),
    above("callbacks.drift.per_decade", 0),
    at_least("callbacks.drift.every_n_steps", 1),
    at_least("callbacks.drift.probe_size", 0),
    at_least("callbacks.drift.probe_batch_size", 1, "an integer >= 1 or null"),
    at_least("callbacks.drift.probe_every", 1),
    at_least("callbacks.drift.probe_epochs", 0),
    *[
        Rule(f"callbacks.drift.{k}", float, lambda v: v > 0, "a number > 0")
        for k in ("settle_threshold", "settle_threshold_logvar", "lag_steps_max_se", "eps")
    ],
    *[
        Rule(f"callbacks.drift.{k}", bool, allowed="true or false")
        for k in ("track_bn", "arrays", "figures")
    ],
    # -- the comparison baselines (docs/baselines.md) ----------------------------------------
    flag("optim.nesterov"),
    flag("optim.compile"),
    Rule("optim.shampoo_beta", float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    at_least("optim.precondition_frequency", 1),
    at_least("optim.max_precond_dim", 1),
    at_least("norm.groups", 1),
    flag("norm.mean_only_bn"),
    Rule("norm.r_max", float, lambda v: v >= 1, "a number >= 1"),
    number_at_least("norm.d_max", 0),
    *[
        Rule(f"norm.{k}", int, lambda v: v >= 0, "an integer >= 0")
        for k in ("relax_start", "r_relax_steps", "d_relax_steps")
    ],
    at_least("model.blocks", 1),
    at_least("model.width", 1),
    Rule("model.shortcut", str, lambda v: v in ("projection", "pad"), "one of: projection, pad"),
]
# Structural keys: checked by instantiate itself ("Error locating target ...").
STRUCTURAL = ("_target_", "*._target_", "_partial_", "*._partial_")


def check_value(
    key: str,
    value: object,
    kind: type | tuple[type, ...],
    ok: Callable[[object], bool],
    allowed: str,
) -> None:
    """Raise a one-line :class:`ConfigError` unless ``value`` has type ``kind`` and passes ``ok``."""
    check(key, value, Expect(kind, ok, allowed))


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
                check_value(key, value, rule.kind, rule.ok, rule.allowed)
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
            value = node.get(name)
            if value is not None and not isinstance(value, DictConfig):
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
    """Keyword parameters of ``target`` (a class or a function), ``None`` if it takes any."""
    try:
        obj = get_object(target)
        params = inspect.signature(obj).parameters.values()
    except Exception:  # noqa: BLE001 - instantiate reports an unknown target itself
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds and p.name != "self"}
