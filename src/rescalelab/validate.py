"""Checks on the composed config that run before anything is built or tracked.

Hydra already rejects unknown options and unknown keys. This module checks what Hydra cannot:
types and ranges of the values, and combinations. Each failure is a :class:`ConfigError` whose
one-line message names the key, the value and what is allowed. Rules apply when the key exists,
so a group option without a key simply has nothing to check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from rescalelab.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    key: str
    kind: type  # int, float, bool or str
    ok: Callable[[object], bool] = lambda v: True
    allowed: str = ""


def positive(kind: type) -> Callable[[object], bool]:
    return lambda v: v > 0  # type: ignore[operator]


RULES: list[Rule] = [
    Rule("seed", int, lambda v: v >= 0, "an integer >= 0"),
    Rule("optim.lr", float, lambda v: v > 0, "a number > 0"),
    Rule("optim.momentum", float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    Rule("optim.weight_decay", float, lambda v: v >= 0, "a number >= 0"),
    Rule("optim.layer_scale", str, lambda v: v in ("none", "fanin"), "one of: none, fanin"),
    Rule("data.batch_size", int, lambda v: v > 0, "an integer > 0"),
    Rule("data.num_train", int, lambda v: v > 0, "an integer > 0"),
    Rule("data.num_val", int, lambda v: v > 0, "an integer > 0"),
    Rule("data.fraction", float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    Rule("norm.momentum", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    Rule("norm.eps", float, lambda v: v > 0, "a number > 0"),
    Rule("trainer.max_epochs", int, lambda v: v >= 1, "an integer >= 1"),
    Rule("trainer.log_every_n_steps", int, lambda v: v >= 1, "an integer >= 1"),
]


def _type_ok(value: object, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_value(
    key: str, value: object, kind: type, ok: Callable[[object], bool], allowed: str
) -> None:
    """Raise a one-line :class:`ConfigError` unless ``value`` has type ``kind`` and passes ``ok``."""
    if not _type_ok(value, kind) or not ok(value):
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed or kind.__name__}")


def validate(cfg: DictConfig, rules: list[Rule] | None = None) -> None:
    """Apply every rule whose key exists in ``cfg``; raise on the first violation."""
    for rule in rules if rules is not None else RULES:
        value = OmegaConf.select(cfg, rule.key, default=None, throw_on_missing=False)
        if value is not None:
            check_value(rule.key, value, rule.kind, rule.ok, rule.allowed)
