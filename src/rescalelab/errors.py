"""The one exception type that turns into a one-line error message and a non-zero exit, and the
one helper with which a constructor checks its own arguments (:func:`checked`)."""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from omegaconf import ListConfig, OmegaConf

EXIT_BAD_INPUT = 2  # bad input: nothing was tracked
EXIT_DIVERGED = 1  # a single run (not a sweep) that diverged: its run is FAILED, diverged

F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(ValueError):
    """Bad input found before training: a config key, a value, a file or a combination.

    The message is printed as one line (``error: <message>``) and the process exits with
    status 2 before any MLflow run exists.
    """


def exit_bad_input(error: ConfigError) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with status 2."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


@dataclass(frozen=True)
class Expect:
    """What a config value must be: its type(s) ``kind``, a test ``ok``, and ``allowed``, the
    words of the message (``expected <allowed>``)."""

    kind: type | tuple[type, ...]
    ok: Callable[[Any], bool] = lambda v: True
    allowed: str = ""


def type_ok(value: object, kind: type | tuple[type, ...]) -> bool:
    """``isinstance`` as a config reads it: a bool is no int, and a float must be finite (inf
    and nan, also 1e400, which YAML reads as inf, are never a valid setting)."""
    if isinstance(kind, tuple):
        return any(type_ok(value, k) for k in kind)
    if kind is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check(key: str, value: object, expect: Expect) -> None:
    """Raise a one-line :class:`ConfigError` (``<key>=<value> is invalid: expected …``) unless
    ``value`` has the type and passes the test of ``expect``."""
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not type_ok(value, expect.kind) or not expect.ok(value):
        kind = expect.kind
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{key}={value!r} is invalid: expected {expect.allowed or name}")


def checked(group: str, **expects: Expect) -> Callable[[F], F]:
    """A constructor that checks its own keyword arguments: ``@checked("schedule", every=...)``.

    Every call checks the named arguments (``None`` always passes: it means "default" or "off")
    and raises one line naming ``<group>.<argument>``. The expectations are also kept on the
    function as ``config_checks``, so that :func:`rescalelab.validate.check_targets` applies
    them to a config node *before* anything is built or tracked (a sweep checks every job
    first), and a new key costs one edit: its parameter and its expectation, side by side.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        missing = set(expects) - set(signature.parameters)
        if missing:
            raise TypeError(f"{fn.__qualname__} has no parameter {sorted(missing)}")

        @functools.wraps(fn)
        def constructor(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            for name, expect in expects.items():
                value = bound.arguments[name]
                if value is not None:
                    check(f"{group}.{name}", value, expect)
            return fn(*args, **kwargs)

        constructor.config_checks = dict(expects)  # type: ignore[attr-defined]
        return constructor  # type: ignore[return-value]

    return decorate
