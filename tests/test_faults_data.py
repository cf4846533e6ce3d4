"""Corrupt CIFAR-10 pickles: one line naming the file, never a traceback, never foreign code.

The CLI cases (a pickle naming a module that does not exist, labels that are strings) are rows
of ``tests/test_bad_input.py``; here the reader itself is fuzzed on real-format fixtures.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from rescalelab.data.cifar10 import read_batch
from rescalelab.errors import ConfigError
from tests.fixtures_data import write_cifar10, write_cifar_bad_module, write_cifar_string_labels


@pytest.fixture
def batch(tmp_path):
    write_cifar10(tmp_path, per_batch=10, test=10)
    return tmp_path / "cifar-10-batches-py" / "data_batch_1"


def test_fuzzed_pickles_give_one_line_naming_the_file(batch):
    """300 copies with 1-3 random bytes changed (in the opcode stream and the keys as often as
    in the pixels), plus every truncation length in steps: each reads as a valid batch or fails
    with a ConfigError naming the file."""
    good = batch.read_bytes()
    rng = np.random.default_rng(0)
    header = 400  # the opcodes, keys, labels and array header come before the pixels
    variants = []
    for i in range(300):
        b = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, header if i % 2 else len(b)))
            b[at] = int(rng.integers(0, 256))
        variants.append(bytes(b))
    variants += [good[:n] for n in range(0, len(good), 997)]
    outcomes = {"valid": 0, "rejected": 0}
    for data in variants:
        batch.write_bytes(data)
        try:
            x, y = read_batch(batch)
        except ConfigError as e:
            assert str(batch) in str(e) and "\n" not in str(e)
            outcomes["rejected"] += 1
            continue
        assert x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32)
        assert y.dtype == np.int64 and len(y) == len(x) and (y >= 0).all() and (y <= 9).all()
        outcomes["valid"] += 1
    assert outcomes["rejected"] > 100  # the header mutations do hit the structure


def test_a_pickle_naming_a_module_is_refused_without_importing_it(batch, tmp_path):
    write_cifar_bad_module(batch)
    with pytest.raises(ConfigError, match=r"it names nonexistent_module\.thing"):
        read_batch(batch)
    # A real importable callable is refused too: nothing but numpy arrays is ever built.
    marker = tmp_path / "ran"
    batch.write_bytes(pickle.dumps({b"data": _Touch(marker)}, protocol=2))
    with pytest.raises(ConfigError, match="which CIFAR-10 never holds"):
        read_batch(batch)
    assert not marker.exists()


class _Touch:
    """Pickles as a call to ``pathlib.Path.touch`` of ``path``: what a hostile file could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (type(self.path).touch, (self.path,))


def test_string_labels_are_refused(batch):
    write_cifar_string_labels(batch)
    with pytest.raises(ConfigError, match=r"has b'labels' that are not a list of integers"):
        read_batch(batch)
