"""What the ``data.*`` keys must be: the :class:`~rescalelab.errors.Expect` of each key that
several DataModules take, shared so that every class declares it with the same words.

Each DataModule declares the keys it owns with :func:`rescalelab.errors.checked` (a key of the
base class once, on the base): a direct call such as ``SyntheticImages(batch_size=0)`` and
:func:`rescalelab.validate.check_targets` on a composed config (before anything is built or
tracked) raise the same one line ``data.<key>=<value> is invalid: expected <words>``.
"""

from __future__ import annotations

import os

from rescalelab.errors import POSITIVE, Expect, at_least, number_at_least, type_ok

COUNT = POSITIVE  # num_train, num_val, batch_size: "an integer > 0"
SEED = at_least(0)
FRACTION = Expect(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")  # of the images
IMAGE_SIZE = at_least(8)
NOISE = number_at_least(0)  # a standard deviation σ


def folder(allowed: str = "a folder") -> Expect:
    """A folder: a non-empty ``str`` from a config, or a ``pathlib.Path`` from a caller."""
    return Expect((str, os.PathLike), lambda v: bool(str(v)), allowed)


FOLDER_PATH = folder()


def _three(value: object, positive: bool) -> bool:
    """Three finite numbers (> 0 with ``positive``): μ_c or σ_c of the three colour channels."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(type_ok(x, float) and (not positive or x > 0) for x in value)
    )


# (list, tuple): a config gives lists, a caller (and ImageNetSubset's defaults) tuples too
MEAN = Expect((list, tuple), lambda v: _three(v, False), "a list of 3 numbers or null")
STD = Expect((list, tuple), lambda v: _three(v, True), "a list of 3 numbers > 0 or null")
CLASSES = Expect(
    (list, tuple),
    lambda v: len(v) >= 2 and all(isinstance(c, str) for c in v),
    "a list of at least 2 class folder names, or null",
)
