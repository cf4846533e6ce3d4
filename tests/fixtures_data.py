"""Test fixtures on disk: the dataset writers (:mod:`rescalelab.data.fixtures`, shared with the
benchmark's data rows) and damaged files for the fault tests."""

from __future__ import annotations

import pickle
from pathlib import Path

from rescalelab.data.fixtures import (  # noqa: F401  (re-exported for the tests)
    LABEL_NAMES,
    cifar_images,
    photo_crop,
    sample_photos,
    wnid,
    write_cifar10,
    write_imagefolder,
)


def truncate_file(path: Path, keep: float = 0.5) -> None:
    """Cut a file to ``keep`` of its bytes (a JPEG cut this way opens but cannot be decoded)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def write_garbage(path: Path) -> None:
    """A file with an image name whose bytes are no image at all."""
    path.write_bytes(b"this is not an image\n" * 20)


def write_cifar_bad_module(path: Path) -> None:
    """A CIFAR-10 batch pickle that names a module that does not exist (a damaged or foreign
    pickle: the opcode stream of protocol 2 with ``nonexistent_module.thing`` as a global)."""
    path.write_bytes(b"\x80\x02cnonexistent_module\nthing\nq\x00)\x81q\x01.")


def write_cifar_string_labels(path: Path) -> None:
    """Rewrite a CIFAR-10 batch pickle with its labels as strings (``b'labels': ['3', ...]``)."""
    with path.open("rb") as f:
        obj = pickle.load(f, encoding="bytes")
    obj[b"labels"] = [str(v) for v in obj[b"labels"]]
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)
