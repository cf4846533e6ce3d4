"""The value rules for the keys no constructor owns, as data: :data:`RULES` (one ``Rule`` a key).

A rule names a key (``*`` wildcards allowed), the type its value must have, a test on the value
and the words that say what is allowed; :func:`rescalelab.validate.validate` applies them.
This file holds that one table (which keys are here and why: validate.py's docstring).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
