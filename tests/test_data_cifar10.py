"""data=cifar10 on a tiny tree in the real python-distribution format."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from rescalelab.data import CIFAR10
from rescalelab.errors import ConfigError
from tests.fixtures_data import LABEL_NAMES, truncate_file, write_cifar10
from tests.helpers import all_runs, assert_ok, history, run_cli


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar10(root, per_batch=100, test=100)


def _setup(root: Path, **kw) -> CIFAR10:
    dm = CIFAR10(root=str(root), **{"batch_size": 50, **kw})
    dm.setup("fit")
    return dm


def test_fixture_has_the_real_keys_dtypes_and_shapes(cifar):
    root, _ = cifar
    with (root / "cifar-10-batches-py" / "data_batch_1").open("rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert set(d) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (100, 3072)
    assert isinstance(d[b"labels"], list) and isinstance(d[b"labels"][0], int)
    with (root / "cifar-10-batches-py" / "batches.meta").open("rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert meta[b"label_names"][0] == b"airplane" and meta[b"num_vis"] == 3072


def test_reads_every_batch_as_one_uint8_tensor_in_file_order(cifar):
    root, ref = cifar
    dm = _setup(root)
    t = dm.tensors
    assert t["x_train"].dtype == torch.uint8 and t["x_train"].shape == (500, 3, 32, 32)
    assert torch.equal(t["x_train"], torch.from_numpy(ref["x_train"]))
    assert torch.equal(t["y_train"], torch.from_numpy(ref["y_train"]))
    assert torch.equal(t["x_val"], torch.from_numpy(ref["x_val"]))
    assert torch.equal(t["y_val"], torch.from_numpy(ref["y_val"]))
    assert dm.classes == LABEL_NAMES and dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    # μ_c, σ_c measured on the training split, in [0, 1] units
    x = ref["x_train"].astype(np.float64) / 255
    assert np.allclose(dm.mean, x.mean(axis=(0, 2, 3)), atol=1e-5)
    assert np.allclose(dm.std, x.std(axis=(0, 2, 3)), atol=1e-5)
    assert dm.describe() == {"num_train": 500, "num_val": 100, "mean": dm.mean, "std": dm.std}


def test_root_may_also_be_the_batches_folder_itself(cifar):
    root, ref = cifar
    dm = _setup(root / "cifar-10-batches-py")
    assert torch.equal(dm.tensors["y_train"], torch.from_numpy(ref["y_train"]))


def test_validation_batches_are_normalized_and_training_batches_augmented(cifar):
    root, ref = cifar
    dm = _setup(root)
    xb, yb = next(iter(dm.val_dataloader()))
    mean = torch.tensor(dm.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.std).view(1, 3, 1, 1)
    expected = (torch.from_numpy(ref["x_val"]).float() / 255 - mean) / std
    assert torch.allclose(xb, expected, atol=1e-5)
    assert torch.equal(yb, torch.from_numpy(ref["y_val"]))
    # training: normalized the same way, after crop/flip (which keep pixels on the 1/255 grid;
    # a padded border comes out as 0, i.e. -μ_c/σ_c)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32
    raw = (x * std + mean) * 255
    assert (raw.round() - raw).abs().max() < 1e-2
    assert (raw.round() == 0).any()  # some padding shows: the crops are shifted


def test_every_epoch_reshuffles_from_the_seed(cifar):
    root, _ = cifar
    orders = []
    for seed in (0, 0, 1):
        batches = _setup(root, seed=seed, augment=False).train_dataloader()
        orders.append([torch.cat([y for _, y in batches]) for _ in range(2)])
    (a0, a1), (b0, b1), (c0, _) = orders
    assert torch.equal(a0, b0) and torch.equal(a1, b1)  # same seed, same order
    assert not torch.equal(a0, a1)  # a new permutation every epoch
    assert not torch.equal(a0, c0)
    assert sorted(a0.tolist()) == sorted(a1.tolist())  # each epoch is a permutation


def test_num_train_keeps_a_seeded_subset_of_the_rows(cifar):
    root, ref = cifar
    a = _setup(root, num_train=120, num_val=30).tensors
    b = _setup(root, num_train=120, num_val=30).tensors
    assert a["x_train"].shape[0] == 120 and a["x_val"].shape[0] == 30
    assert torch.equal(a["x_train"], b["x_train"])
    rows = {bytes(r) for r in ref["x_train"].reshape(500, -1)}
    assert all(bytes(r) in rows for r in a["x_train"].reshape(120, -1).numpy())


# -- errors -------------------------------------------------------------------------------------
def _copy_tree(src: Path, dst: Path) -> Path:
    (dst / "cifar-10-batches-py").mkdir(parents=True)
    for f in (src / "cifar-10-batches-py").iterdir():
        (dst / "cifar-10-batches-py" / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_dataset_names_the_expected_layout(tmp_path):
    with pytest.raises(ConfigError) as e:
        _setup(tmp_path / "nowhere")
    msg = str(e.value)
    assert "has no CIFAR-10 dataset" in msg and "cifar-10-batches-py/" in msg
    assert "data_batch_1..5,test_batch,batches.meta" in msg and "data.download=true" in msg
    assert "\n" not in msg


def test_incomplete_dataset_names_the_missing_files(cifar, tmp_path):
    root = _copy_tree(cifar[0], tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    (root / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(ConfigError, match=r"incomplete .*missing data_batch_3, batches.meta"):
        _setup(root)


def test_truncated_pickle_names_the_file(cifar, tmp_path):
    root = _copy_tree(cifar[0], tmp_path)
    truncate_file(root / "cifar-10-batches-py" / "data_batch_2")
    with pytest.raises(ConfigError) as e:
        _setup(root)
    assert f"cannot read {root / 'cifar-10-batches-py' / 'data_batch_2'}" in str(e.value)
    assert "truncated" in str(e.value)


def test_wrong_pixel_array_is_refused(cifar, tmp_path):
    root = _copy_tree(cifar[0], tmp_path)
    path = root / "cifar-10-batches-py" / "test_batch"
    d = pickle.loads(path.read_bytes(), encoding="bytes")
    d[b"data"] = d[b"data"].astype(np.float32)
    path.write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(ConfigError, match=r"test_batch has b'data' float32\[100, 3072\]"):
        _setup(root)


def test_verify_checks_the_official_md5(cifar):
    root, _ = cifar
    digest = hashlib.md5((root / "cifar-10-batches-py" / "data_batch_1").read_bytes()).hexdigest()
    with pytest.raises(ConfigError) as e:
        _setup(root, verify=True)
    assert "data_batch_1 does not have the md5 of the official file" in str(e.value)
    assert digest not in str(e.value)  # it names the expected (official) md5
    assert "c99cafc152244af753f735de768cd75f" in str(e.value)
    _setup(root, verify=False)  # the default reads the fixture fine


# -- end to end ---------------------------------------------------------------------------------
CLI = ["data=cifar10", "data.batch_size=50", "trainer.max_epochs=2",
       "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false"]  # fmt: skip


def test_cli_trains_on_cifar10_and_records_the_data(cifar, root):
    data_root, _ = cifar
    proc = run_cli(root, *CLI, f"data.root={data_root}", "optim.lr=0.05", tiny=False)
    assert_ok(proc)
    (run,) = all_runs(root)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["data._target_"] == "rescalelab.data.CIFAR10"
    assert p["data.num_train"] == "500" and p["data.num_val"] == "100"
    assert p["data.mean"].startswith("[0.4")  # measured μ_c replaces the null of the config
    # 500 images / 50 = 10 steps per epoch, 2 epochs, logged every 5 steps
    assert [s for s, _ in history(root, run.info.run_id, "train/loss")] == [4, 9, 14, 19]
    assert len(history(root, run.info.run_id, "val/acc")) == 2


def test_cli_missing_dataset_fails_before_any_run(root, tmp_path):
    proc = run_cli(root, *CLI, f"data.root={tmp_path / 'absent'}", tiny=False)
    assert proc.returncode == 2
    assert f"error: data.root={tmp_path / 'absent'} has no CIFAR-10 dataset" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert all_runs(root) == []
