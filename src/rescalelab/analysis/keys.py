"""The one metric-key cleaner of analysis: a label made into a key MLflow accepts.

MLflow allows word characters, ``/``, ``.``, ``-`` and space in a metric key; every other
character becomes ``_`` (so ``theory/plateau_0`` stays, ``optim.lr=0.1`` → ``optim.lr_0.1``).
The reports' parent metrics (the sweep summary's ``<method>/best_final``, the theory report's
``theory/<quantity>_<i>``) go through it. (The resilient logger keeps Lightning's own rule for
training metrics, which drops such characters: those keys are the logger's, not analysis'.)
"""

from __future__ import annotations

import re

_NOT_ALLOWED = re.compile(r"[^\w./ -]")


def metric_key(text: str) -> str:
    """``text`` with every character MLflow refuses in a metric key replaced by ``_``."""
    return _NOT_ALLOWED.sub("_", text)
