"""data.label_noise: a fraction p of the training labels redrawn uniformly, fixed by the seed,
validation untouched, the replaced indices recorded as the artifact data/label_noise.tsv."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from rescalelab.data import Digits, SyntheticImages
from tests.helpers import all_runs, assert_ok, client, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic(**kw) -> dict[str, torch.Tensor]:
    dm = SyntheticImages(num_train=1000, num_val=200, image_size=8, batch_size=50, **kw)
    dm.setup()
    return dm


def test_label_noise_1_changes_exactly_the_training_labels_reproducibly_per_seed():
    clean, noisy = _synthetic(seed=3), _synthetic(seed=3, label_noise=1.0)
    for key in ("x_train", "x_val", "y_val"):  # the images and the validation labels stay
        assert torch.equal(clean.tensors[key], noisy.tensors[key]), key
    assert torch.equal(noisy.replaced, torch.arange(1000))  # every label was redrawn
    changed = (clean.tensors["y_train"] != noisy.tensors["y_train"]).double().mean().item()
    assert 0.85 < changed < 0.95  # redrawn uniformly from 10 classes: 9 in 10 change
    counts = torch.bincount(noisy.tensors["y_train"], minlength=10)
    assert counts.min() > 60  # uniform over the classes (100 expected each)
    again = _synthetic(seed=3, label_noise=1.0)
    assert torch.equal(again.tensors["y_train"], noisy.tensors["y_train"])
    other = _synthetic(seed=4, label_noise=1.0)
    assert not torch.equal(other.tensors["y_train"], _synthetic(seed=4).tensors["y_train"])
    assert (other.tensors["y_train"] != noisy.tensors["y_train"]).any()


def test_label_noise_half_replaces_half_of_the_labels_and_nothing_else():
    clean, noisy = _synthetic(seed=0), _synthetic(seed=0, label_noise=0.5)
    assert len(noisy.replaced) == 500 and len(set(noisy.replaced.tolist())) == 500
    diff = torch.nonzero(clean.tensors["y_train"] != noisy.tensors["y_train"]).flatten()
    assert set(diff.tolist()) <= set(noisy.replaced.tolist())  # only replaced ones change
    assert 0.40 < len(diff) / 1000 < 0.50  # p (1 - 1/K) = 0.45
    assert clean.replaced is None  # p = 0: nothing redrawn, no artifact
    assert clean.artifacts == {} and "label_noise.tsv" in noisy.artifacts


def test_digits_label_noise_leaves_the_validation_split_clean():
    clean = Digits(image_size=8, channels=1, batch_size=32, seed=1)
    noisy = Digits(image_size=8, channels=1, batch_size=32, seed=1, label_noise=0.5)
    clean.setup(), noisy.setup()
    assert torch.equal(clean.tensors["y_val"], noisy.tensors["y_val"])
    diff = torch.nonzero(clean.tensors["y_train"] != noisy.tensors["y_train"]).flatten()
    assert len(diff) > 0 and set(diff.tolist()) <= set(noisy.replaced.tolist())


@pytest.mark.parametrize("option", ["synthetic", "digits", "cifar10", "imagenet_subset"])
def test_every_image_data_option_takes_label_noise_and_train_eval_size(option, tmp_path):
    with initialize_config_module("rescalelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"data={option}", "data.label_noise=0.25",
                                          "data.train_eval_size=64", f"paths.root={tmp_path}"])  # fmt: skip
    dm = instantiate(cfg.data)  # no setup: cifar10/imagenet files are not on this machine
    assert (dm.label_noise, dm.train_eval_size) == (0.25, 64)


def test_cli_records_the_replaced_labels_as_an_artifact(root: Path):
    assert_ok(run_cli(root, "data.label_noise=1", "seed=2"))
    (run,) = all_runs(root)
    assert run.data.params["data.num_noisy_labels"] == "512"
    local = client(root).download_artifacts(run.info.run_id, "data/label_noise.tsv", str(root))
    with open(local) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    clean = SyntheticImages(num_train=512, num_val=128, batch_size=64, seed=2)
    noisy = SyntheticImages(num_train=512, num_val=128, batch_size=64, seed=2, label_noise=1.0)
    clean.setup(), noisy.setup()
    assert [int(r["index"]) for r in rows] == list(range(512))
    assert [int(r["clean"]) for r in rows] == clean.tensors["y_train"].tolist()
    assert [int(r["label"]) for r in rows] == noisy.tensors["y_train"].tolist()


def test_bad_label_noise_is_a_one_line_error_before_any_run(root: Path):
    proc = run_cli(root, "data.label_noise=1.5")
    assert proc.returncode == 2
    assert "error: data.label_noise=1.5 is invalid: expected a fraction in [0, 1]" in proc.stderr
    assert all_runs(root) == []
