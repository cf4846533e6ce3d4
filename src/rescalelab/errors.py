"""The one exception type that turns into a one-line error message and a non-zero exit, and the
one helper with which a constructor checks its own arguments (:func:`checked`)."""

from __future__ import annotations

import dataclasses
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
    nullable: bool = True  # ``null`` passes (it means "default" or "off"); see :func:`required`


def required(expect: Expect) -> Expect:
    """``expect`` for an argument that has no ``null`` meaning: ``None`` is refused too."""
    return dataclasses.replace(expect, nullable=False)


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
    ``value`` has the type and passes the test of ``expect``, or is ``None`` where that is
    allowed (``expect.nullable``)."""
    if value is None and expect.nullable:
        return
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not type_ok(value, expect.kind) or not expect.ok(value):
        kind = expect.kind
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{key}={value!r} is invalid: expected {expect.allowed or name}")


def at_least(low: int, allowed: str = "") -> Expect:
    """An integer >= ``low``."""
    return Expect(int, lambda v: v >= low, allowed or f"an integer >= {low}")


def number_at_least(low: float, allowed: str = "") -> Expect:
    """A finite number >= ``low``."""
    return Expect(float, lambda v: v >= low, allowed or f"a number >= {low}")


def above(low: float, allowed: str = "") -> Expect:
    """A finite number > ``low``."""
    return Expect(float, lambda v: v > low, allowed or f"a number > {low}")


def one_of(*words: str) -> Expect:
    """One of the words ``words``."""
    return Expect(str, lambda v: v in words, "one of: " + ", ".join(words))


FLAG = Expect(bool, allowed="true or false")
POSITIVE = Expect(int, lambda v: v > 0, "an integer > 0")


def checked(group: str, **expects: Expect) -> Callable[[F], F]:
    """A constructor that checks its own keyword arguments: ``@checked("schedule", every=...)``.

    Decorates a function, an ``__init__``, or a class (above ``@dataclass``, whose
    generated ``__init__`` it wraps): a class inherits the checks of its decorated bases and
    adds its own. Every call checks the named arguments (``None`` passes unless the check
    is :func:`required`: elsewhere it means "default" or "off") and raises one line naming
    ``<group>.<argument>``. The expectations are also kept as ``config_checks`` (on the
    function, or on the class), so that
    :func:`rescalelab.validate.check_targets` applies them to a config node *before*
    anything is built or tracked (a sweep checks every job first), and a new key costs one
    edit: its parameter and its expectation, side by side.
    """

    def decorate(obj: F) -> F:
        if isinstance(obj, type):
            merged = {**getattr(obj, "config_checks", {}), **expects}
            obj.__init__ = _checking(obj.__init__, group, merged)  # type: ignore[misc]
            obj.config_checks = merged  # type: ignore[attr-defined]
            return obj
        constructor = _checking(obj, group, expects)
        constructor.config_checks = dict(expects)  # type: ignore[attr-defined]
        return constructor  # type: ignore[return-value]

    return decorate


def _checking(fn: Callable[..., Any], group: str, expects: dict[str, Expect]) -> Any:
    """``fn`` that first checks its arguments named in ``expects``.

    A name that is not a parameter of ``fn`` must go to its ``**kwargs`` (a constructor that
    forwards keys to another one declares them by their checks); it is checked when passed.
    """
    wrong = sorted(k for k, v in expects.items() if not isinstance(v, Expect))
    if wrong:
        raise TypeError(f"{fn.__qualname__}: the checks of {wrong} are not Expect instances")
    signature = inspect.signature(fn)
    params = signature.parameters
    var_kw = next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), None)
    missing = set(expects) - set(params)
    if missing and var_kw is None:
        raise TypeError(f"{fn.__qualname__} has no parameter {sorted(missing)}")

    @functools.wraps(fn)
    def constructor(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        forwarded = bound.arguments.get(var_kw, {}) if var_kw else {}
        for name, expect in expects.items():
            if name in params:
                check(f"{group}.{name}", bound.arguments[name], expect)
            elif name in forwarded:
                check(f"{group}.{name}", forwarded[name], expect)
        return fn(*args, **kwargs)

    return constructor
