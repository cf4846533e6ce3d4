"""Checks on the composed config that run before anything is built or tracked.

Hydra already rejects unknown options and overrides of keys that do not exist. This module
checks what Hydra cannot: types and ranges of the values (:data:`RULES`, the schema of every
key of every option: :func:`uncovered_keys` lists keys without a rule, and a test keeps that
list empty), keys *added* with ``+`` (:func:`check_added_keys`), and combinations. Each failure
is a :class:`ConfigError` whose one-line message names the key, the value and what is allowed.
Rules apply when the key exists, so a group option without a key simply has nothing to check;
``null`` always passes (it means "default" or "off" wherever an option allows it). A rule key
may hold ``*`` wildcards (``callbacks.*.dirpath``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from rescalelab.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    key: str
    kind: type | tuple[type, ...]  # int, float, bool, str, list, or a tuple of them
    ok: Callable[[object], bool] = lambda v: True
    allowed: str = ""


def positive(kind: type) -> Callable[[object], bool]:
    return lambda v: v > 0  # type: ignore[operator]


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
    Rule("optim.lr", float, lambda v: v > 0, "a number > 0"),
    Rule("optim.momentum", float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    Rule("optim.weight_decay", float, lambda v: v >= 0, "a number >= 0"),
    Rule("optim.layer_scale", str, lambda v: v in ("none", "fanin"), "one of: none, fanin"),
    Rule("data.batch_size", int, lambda v: v > 0, "an integer > 0"),
    Rule("data.num_train", int, lambda v: v > 0, "an integer > 0"),
    Rule("data.num_val", int, lambda v: v > 0, "an integer > 0"),
    Rule("data.fraction", float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    Rule("data.val_fraction", float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    Rule("data.image_size", int, lambda v: v >= 8, "an integer >= 8"),
    Rule("data.num_workers", int, lambda v: v >= 0, "an integer >= 0"),
    Rule("data.crop_padding", int, lambda v: v >= 0, "an integer >= 0"),
    Rule("model.dropout", float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    Rule("norm.momentum", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    Rule("norm.eps", float, lambda v: v > 0, "a number > 0"),
    Rule("norm.interval", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("norm.init_batches", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("norm.warmup_epochs", int, lambda v: v >= 0, "an integer >= 0"),
    Rule(
        "norm.eps_mode", str, lambda v: v in ("absolute", "relative"), "one of: absolute, relative"
    ),
    Rule("norm.max_scale", float, lambda v: v >= 1, "null or a number >= 1"),
    Rule("norm.min_active", float, lambda v: 0 < v <= 1, "null or a fraction in (0, 1]"),
    Rule("data.train_eval_size", int, lambda v: v >= 1, "null or an integer >= 1"),
    Rule("norm.lr_after_switch", float, lambda v: v > 0, "a number > 0 or null"),
    Rule("trainer.max_epochs", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("logger.system_metrics", float, lambda v: v > 0, "null or a number of seconds > 0"),
    Rule("n_seeds", int, lambda v: v >= 1, "an integer >= 1 (seeds 0..n_seeds-1 of a preset)"),
    Rule("budget_trial", int, lambda v: v >= 0, "an integer >= 0 (set by hparams_search=budget)"),
    Rule("trainer.log_every_n_steps", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("trainer.num_nodes", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("optim.alpha", float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    Rule("optim.eps", float, lambda v: v > 0, "a number > 0"),
    Rule("optim.lr_decay", float, lambda v: v >= 0, "a number >= 0"),
    Rule("optim.decay_exclude", bool, allowed="true or false"),
    Rule("schedule.mode", str, lambda v: v in ("every", "plateau"), "one of: every, plateau"),
    Rule("schedule.every", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("schedule.gamma", float, lambda v: v >= 0, "a number >= 0"),
    Rule("schedule.smoothing", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    Rule("schedule.patience", int, lambda v: v >= 0, "an integer >= 0"),
    Rule("schedule.period", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("schedule.min_factor", float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    Rule("data.dim", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("data.cond", float, lambda v: v >= 1, "a number >= 1"),
    Rule("data.lam", float, lambda v: v >= 0, "a number >= 0"),
    Rule("data.noise_std", float, lambda v: v >= 0, "a number >= 0"),
    Rule("data.label_noise", float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    Rule("callbacks.theory.every_n_steps", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("callbacks.train_eval.every_n_epochs", int, lambda v: v >= 1, "an integer >= 1"),
    Rule(
        "runner",
        str,
        lambda v: False,
        "a node with a _target_ (e.g. experiment=theory_diminishing) or null",
    ),
    Rule("runner.runs", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("runner.every_n_steps", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("runner.per_decade", int, lambda v: v >= 0, "an integer >= 0"),
    # -- the rest of the schema: every key of every option has a rule (see uncovered_keys) ----
    Rule("resume", bool, allowed="true or false"),
    Rule("optimized_metric", str, lambda v: bool(v), "a logged metric such as val/loss"),
    Rule("ckpt_path", str, lambda v: bool(v), "a checkpoint file or null"),
    Rule("paths.*", str, lambda v: bool(v), "a path"),
    Rule("logger.experiment_name", str, lambda v: bool(v.strip()), "a non-empty name"),
    Rule(
        "logger.tracking_uri", str, _is_uri, "a URI such as sqlite:///<file>.db or http://host:port"
    ),
    Rule("logger.log_model", bool, allowed="true or false"),
    Rule("data.seed", int, lambda v: v >= 0, "an integer >= 0"),
    Rule("data.problem_seed", int, lambda v: v >= 0, "an integer >= 0"),
    Rule("data.num_classes", int, lambda v: v >= 2, "an integer >= 2"),
    Rule("data.channels", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("data.field_noise", float, lambda v: v >= 0, "a number >= 0"),
    Rule("data.pixel_noise", float, lambda v: v >= 0, "a number >= 0"),
    Rule("data.weight_scale", float, lambda v: v > 0, "a number > 0"),
    Rule("data.resize_size", int, lambda v: v >= 8, "an integer >= 8 or null"),
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
    Rule("model.bias", bool, allowed="true or false"),
    Rule("model.init", str, lambda v: v in ("zeros", "default"), "one of: zeros, default"),
    Rule("model.pool_size", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("norm.sync", bool, allowed="true or false"),
    Rule(
        "optim.betas",
        list,
        lambda v: _numbers(v, 2, lambda x: 0 <= x < 1),
        "a list of 2 numbers in [0, 1)",
    ),
    Rule("optim.initial_accumulator_value", float, lambda v: v >= 0, "a number >= 0"),
    Rule("schedule.interval", str, lambda v: v in ("step", "epoch"), "one of: step, epoch"),
    Rule("schedule.frequency", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("schedule.threshold", float, lambda v: v >= 0, "a number >= 0"),
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
    Rule("trainer.num_sanity_val_steps", int, lambda v: v >= -1, "an integer >= -1"),
    Rule("trainer.max_steps", int, lambda v: v >= -1, "an integer >= -1"),
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
    Rule("callbacks.progress.refresh_rate", int, lambda v: v >= 0, "an integer >= 0"),
    Rule(
        "callbacks.checkpoint.monitor", str, lambda v: bool(v), "a logged metric such as val/loss"
    ),
    Rule("callbacks.checkpoint.mode", str, lambda v: v in ("min", "max"), "one of: min, max"),
    Rule("callbacks.checkpoint.save_top_k", int, lambda v: v >= -1, "an integer >= -1"),
    Rule(
        "callbacks.checkpoint.save_last",
        (bool, str),
        lambda v: v in (True, False, "link"),
        "true, false or link",
    ),
    Rule("callbacks.*.enable_version_counter", bool, allowed="true or false"),
    Rule("callbacks.last.every_n_train_steps", int, lambda v: v >= 1, "an integer >= 1 or null"),
    Rule("callbacks.last.on_signal", bool, allowed="true or false"),
    Rule("callbacks.last.flush_timeout", float, lambda v: v >= 0, "a number >= 0"),
    Rule("callbacks.guard.max_factor", float, lambda v: v > 1, "a number > 1 or null"),
    Rule("callbacks.guard.check_every_n_steps", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("callbacks.theory.per_decade", int, lambda v: v >= 0, "an integer >= 0"),
    Rule("callbacks.drift.dense_steps", int, lambda v: v >= 0, "an integer >= 0"),
    Rule("callbacks.drift.metrics", str, lambda v: v in ("compact", "all"), "one of: compact, all"),
    Rule("callbacks.bn_warmup.window", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("callbacks.stepsizes.var_threshold", float, lambda v: v > 0, "a number > 0"),
    Rule("callbacks.stepsizes.per_step", bool, allowed="true or false"),
    Rule("callbacks.bn_warmup.extra_steps", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("callbacks.drift.per_decade", float, lambda v: v > 0, "a number > 0"),
    Rule("callbacks.drift.every_n_steps", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("callbacks.drift.probe_size", int, lambda v: v >= 0, "an integer >= 0"),
    Rule("callbacks.drift.probe_batch_size", int, lambda v: v >= 1, "an integer >= 1 or null"),
    Rule("callbacks.drift.probe_every", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("callbacks.drift.probe_epochs", int, lambda v: v >= 0, "an integer >= 0"),
    *[
        Rule(f"callbacks.drift.{k}", float, lambda v: v > 0, "a number > 0")
        for k in ("settle_threshold", "settle_threshold_logvar", "lag_steps_max_se", "eps")
    ],
    *[
        Rule(f"callbacks.drift.{k}", bool, allowed="true or false")
        for k in ("track_bn", "arrays", "figures")
    ],
    # -- the comparison baselines (docs/baselines.md) ----------------------------------------
    Rule("optim.nesterov", bool, allowed="true or false"),
    Rule("optim.compile", bool, allowed="true or false"),
    Rule("optim.shampoo_beta", float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    Rule("optim.precondition_frequency", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("optim.max_precond_dim", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("schedule.warmup_epochs", float, lambda v: v >= 0, "a number >= 0"),
    Rule("schedule.final_factor", float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    Rule("schedule.start_factor", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    Rule("schedule.steps_per_epoch", int, lambda v: v >= 1, "an integer >= 1 or null"),
    Rule("norm.groups", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("norm.mean_only_bn", bool, allowed="true or false"),
    Rule("norm.r_max", float, lambda v: v >= 1, "a number >= 1"),
    Rule("norm.d_max", float, lambda v: v >= 0, "a number >= 0"),
    *[
        Rule(f"norm.{k}", int, lambda v: v >= 0, "an integer >= 0")
        for k in ("relax_start", "r_relax_steps", "d_relax_steps")
    ],
    Rule("model.blocks", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("model.width", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("model.shortcut", str, lambda v: v in ("projection", "pad"), "one of: projection, pad"),
]
# Structural keys: checked by instantiate itself ("Error locating target ...").
STRUCTURAL = ("_target_", "*._target_", "_partial_", "*._partial_")


def _type_ok(value: object, kind: type | tuple[type, ...]) -> bool:
    if isinstance(kind, tuple):
        return any(_type_ok(value, k) for k in kind)
    if kind is float:
        # inf and nan (also 1e400, which YAML reads as inf) are never a valid setting
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_value(
    key: str,
    value: object,
    kind: type | tuple[type, ...],
    ok: Callable[[object], bool],
    allowed: str,
) -> None:
    """Raise a one-line :class:`ConfigError` unless ``value`` has type ``kind`` and passes ``ok``."""
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not _type_ok(value, kind) or not ok(value):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed or name}")


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
    check_theory(cfg)


def check_schedule_warmup(cfg: DictConfig) -> None:
    """``schedule.warmup_epochs`` must leave cosine epochs in a run of ``trainer.max_epochs``."""
    warmup = OmegaConf.select(cfg, "schedule.warmup_epochs", default=None)
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    if warmup is None or not isinstance(epochs, int) or max_steps not in (-1, None):
        return
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
    """Leaf keys of ``cfg`` that no rule (and no structural pattern) covers."""
    patterns = [r.key for r in (rules if rules is not None else RULES)] + list(STRUCTURAL)
    return [
        k
        for k, v in leaves(cfg)
        if not any(fnmatchcase(k, p) for p in patterns)
        and not (v is None and k.startswith("callbacks.") and k.count(".") == 1)  # dropped
    ]


CONF_DIR = Path(__file__).parent / "conf"
# Keys of an optim/schedule node that rescalelab consumes before calling the target.
OWN_KEYS = {"optim": ("layer_scale", "decay_exclude"), "schedule": ("interval", "frequency")}


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
        allowed |= set(OWN_KEYS.get(parent, ()))
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
