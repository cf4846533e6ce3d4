"""data=digits: scikit-learn's real 8x8 digits, upsampled, offline."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from rescalelab.data import Digits
from tests.helpers import all_runs, assert_ok, history, run_cli


def test_digits_are_upsampled_real_images_with_a_stratified_split():
    dm = Digits(image_size=32, channels=3, val_fraction=0.2, seed=0)
    dm.setup("fit")
    t = dm.tensors
    ref = load_digits()
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == 10
    assert t["x_train"].dtype == torch.uint8 and t["x_train"].shape[1:] == (3, 32, 32)
    assert len(t["x_train"]) + len(t["x_val"]) == len(ref.target) == 1797
    # every class gives round(0.2 n_c) images to validation
    counts = np.bincount(ref.target, minlength=10)
    assert np.bincount(t["y_val"].numpy(), minlength=10).tolist() == [
        round(0.2 * n) for n in counts
    ]
    # the pixels: 0..16 scaled to 0..255, bilinear upsampling, grey replicated to 3 channels
    i = 0
    x_all = torch.from_numpy(ref.images).float().unsqueeze(1) * (255 / 16)
    expected = F.interpolate(x_all, size=(32, 32), mode="bilinear", align_corners=False)
    expected = expected.round().clamp(0, 255).to(torch.uint8)
    val_rows = {bytes(r) for r in expected[:, 0].reshape(1797, -1).numpy()}
    assert all(bytes(r) in val_rows for r in t["x_val"][:, 0].reshape(len(t["x_val"]), -1).numpy())
    assert torch.equal(t["x_train"][:, 0], t["x_train"][:, 2])
    assert abs(dm.mean[i] - t["x_train"].double().mean().item() / 255) < 1e-5
    # same seed, same split; other seed, another split
    again = Digits(seed=0)
    again.setup()
    other = Digits(seed=1)
    other.setup()
    assert torch.equal(again.tensors["y_val"], t["y_val"])
    assert torch.equal(again.tensors["x_val"], t["x_val"])
    assert not torch.equal(other.tensors["x_val"], t["x_val"])


def test_one_channel_and_small_sizes():
    dm = Digits(image_size=8, channels=1, num_train=100, num_val=50, batch_size=50)
    dm.setup()
    assert dm.tensors["x_train"].shape == (100, 1, 8, 8)
    assert len(dm.tensors["x_val"]) == 50
    ref = load_digits()
    rows = {bytes((np.round(im * 255 / 16)).astype(np.uint8)) for im in ref.images}
    assert all(bytes(x[0].numpy()) in rows for x in dm.tensors["x_train"])  # no resampling at 8


def test_cli_small_cnn_learns_the_digits(root):
    proc = run_cli(
        root, "data=digits", "norm=bn", "trainer.max_epochs=3", "optim.lr=0.1",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", tiny=False,
    )  # fmt: skip
    assert_ok(proc)
    (run,) = all_runs(root)
    assert run.data.params["data._target_"] == "rescalelab.data.Digits"
    assert run.data.params["data.num_train"] == "1438"
    losses = [v for _, v in history(root, run.info.run_id, "train/loss")]
    assert losses[0] > 2.0  # ~ log(10) at the start
    assert run.data.metrics["val/acc"] > 0.9  # chance is 0.1 (0.98 measured)
