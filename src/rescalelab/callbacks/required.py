"""Arguments that have no ``null`` meaning: :func:`rescalelab.errors.checked` lets ``None``
pass (it means "default" or "off" where a parameter has such a setting), so a callback whose
parameter has neither rejects it here, with the same one line as its declared check."""

from __future__ import annotations

from rescalelab.errors import ConfigError


def required(cls: type, group: str, **values: object) -> None:
    """Raise ``<group>.<name>=None is invalid: expected <allowed>`` for the first ``None`` of
    ``values``; ``allowed`` is the words of ``cls``'s declared check of that argument."""
    for name, value in values.items():
        if value is None:
            allowed = cls.config_checks[name].allowed  # type: ignore[attr-defined]
            raise ConfigError(f"{group}.{name}=None is invalid: expected {allowed}")
