"""The value rules for the keys no constructor of rescalelab owns, as data: :data:`RULES`.

A rule names a key (``*`` wildcards allowed) and its :class:`~rescalelab.errors.Expect`: the
type its value must have, a test on the value and the words that say what is allowed;
:func:`rescalelab.validate.validate` applies them without importing torch. The keys here are
those of torch's optimizers (which do not speak the one-line contract: ``lr=inf`` passes
torch), Lightning's Trainer, ModelCheckpoint and ``lr_scheduler_config``, the logger, paths
and the top-level keys. Every key of ``data``, ``model``, ``norm``, ``callbacks``,
``schedule`` and ``param_groups`` is checked by its constructor instead
(:func:`rescalelab.errors.checked`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rescalelab.errors import FLAG, Expect, above, at_least, number_at_least, one_of
from rescalelab.errors import type_ok as _type_ok


@dataclass(frozen=True)
class Rule:
    key: str  # a dotted key, ``*`` wildcards allowed
    expect: Expect


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
    Rule("seed", Expect(int, lambda v: 0 <= v <= 2**32 - 1, "an integer in [0, 4294967295]")),
    Rule("optim.lr", above(0)),
    Rule("optim.momentum", Expect(float, lambda v: 0 <= v < 1, "a number in [0, 1)")),
    Rule("optim.weight_decay", number_at_least(0)),
    Rule("trainer.max_epochs", at_least(1)),
    # Lightning's lr_scheduler_config: a plain dict, no constructor of ours checks it
    Rule(
        "lr_scheduler_config.interval",
        one_of("step", "epoch"),
    ),
    Rule("lr_scheduler_config.frequency", at_least(1)),
    Rule(
        "logger.system_metrics", Expect(float, lambda v: v > 0, "null or a number of seconds > 0")
    ),
    Rule("n_seeds", at_least(1, "an integer >= 1 (seeds 0..n_seeds-1 of a preset)")),
    Rule("budget_trial", at_least(0, "an integer >= 0 (set by hparams_search=budget)")),
    Rule("trainer.log_every_n_steps", at_least(1)),
    Rule("trainer.num_nodes", at_least(1)),
    Rule("optim.alpha", Expect(float, lambda v: 0 < v < 1, "a number in (0, 1)")),
    Rule("optim.eps", above(0)),
    Rule("optim.lr_decay", number_at_least(0)),
    Rule(
        "runner",
        Expect(
            str,
            lambda v: False,
            "a node with a _target_ (e.g. experiment=theory_diminishing) or null",
        ),
    ),
    Rule("runner.runs", at_least(1)),
    Rule("runner.every_n_steps", at_least(1)),
    Rule("runner.per_decade", at_least(0)),
    # -- the rest of the schema: every key of every option has a rule (see uncovered_keys) ----
    Rule("resume", FLAG),
    Rule("optimized_metric", Expect(str, lambda v: bool(v), "a logged metric such as val/loss")),
    Rule("ckpt_path", Expect(str, lambda v: bool(v), "a checkpoint file or null")),
    Rule("paths.*", Expect(str, lambda v: bool(v), "a path")),
    Rule("logger.experiment_name", Expect(str, lambda v: bool(v.strip()), "a non-empty name")),
    Rule(
        "logger.tracking_uri",
        Expect(str, _is_uri, "a URI such as sqlite:///<file>.db or http://host:port"),
    ),
    Rule("logger.log_model", FLAG),
    Rule(
        "optim.betas",
        Expect(
            list,
            lambda v: _numbers(v, 2, lambda x: 0 <= x < 1),
            "a list of 2 numbers in [0, 1)",
        ),
    ),
    Rule("optim.initial_accumulator_value", number_at_least(0)),
    Rule(
        "trainer.accelerator",
        one_of("cpu", "gpu", "cuda", "mps", "auto"),
    ),
    Rule(
        "trainer.devices",
        Expect(
            (int, str, list),
            lambda v: (
                (v >= 1 or v == -1) if isinstance(v, int) else v == "auto" or isinstance(v, list)
            ),
            "an integer >= 1, -1, auto, or a list of device indices",
        ),
    ),
    Rule(
        "trainer.deterministic",
        Expect(
            (bool, str),
            lambda v: v in (True, False, "warn"),
            "true, false or warn",
        ),
    ),
    Rule("trainer.num_sanity_val_steps", at_least(-1)),
    Rule("trainer.max_steps", at_least(-1)),
    *[
        Rule(
            f"trainer.{k}",
            Expect((int, float), _batches_or_fraction, "an integer >= 0 or a fraction"),
        )
        for k in ("limit_train_batches", "limit_val_batches", "val_check_interval")
    ],
    Rule(
        "trainer.precision",
        Expect(
            (str, int),
            lambda v: str(v) in PRECISIONS,
            f"one of: {', '.join(PRECISIONS)}",
        ),
    ),
    Rule("trainer.default_root_dir", Expect(str, lambda v: bool(v), "a folder")),
    Rule("trainer.strategy", Expect(str, lambda v: bool(v), "a Lightning strategy name")),
    Rule(
        "trainer.strategy.process_group_backend",
        one_of("gloo", "nccl", "mpi"),
    ),
    Rule(
        "trainer.strategy.start_method",
        one_of("spawn", "fork", "forkserver", "popen"),
    ),
    *[
        Rule(f"trainer.{k}", FLAG)
        for k in (
            "benchmark",
            "channels_last",
            "enable_model_summary",
            "enable_progress_bar",
            "sync_norm",
            "enable_checkpointing",
        )
    ],
    Rule("callbacks.*.dirpath", Expect(str, lambda v: bool(v), "a folder")),
    Rule("callbacks.*.filename", Expect(str, lambda v: bool(v) and "/" not in v, "a file name")),
    Rule(
        "callbacks.checkpoint.monitor",
        Expect(str, lambda v: bool(v), "a logged metric such as val/loss"),
    ),
    Rule("callbacks.checkpoint.mode", one_of("min", "max")),
    Rule("callbacks.checkpoint.save_top_k", at_least(-1)),
    Rule(
        "callbacks.checkpoint.save_last",
        Expect(
            (bool, str),
            lambda v: v in (True, False, "link"),
            "true, false or link",
        ),
    ),
    Rule("callbacks.*.enable_version_counter", FLAG),
    # -- the comparison baselines (docs/baselines.md) ----------------------------------------
    Rule("optim.nesterov", FLAG),
    Rule("optim.compile", FLAG),
    Rule("optim.shampoo_beta", Expect(float, lambda v: 0 <= v < 1, "a number in [0, 1)")),
    Rule("optim.precondition_frequency", at_least(1)),
    Rule("optim.max_precond_dim", at_least(1)),
]
