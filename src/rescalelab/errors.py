"""The one exception type that turns into a one-line error message and a non-zero exit."""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_BAD_INPUT = 2  # bad input: nothing was tracked
EXIT_DIVERGED = 1  # a single run (not a sweep) that diverged: its run is FAILED, diverged


class ConfigError(ValueError):
    """Bad input found before training: a config key, a value, a file or a combination.

    The message is printed as one line (``error: <message>``) and the process exits with
    status 2 before any MLflow run exists.
    """


def exit_bad_input(error: ConfigError) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with status 2."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)
