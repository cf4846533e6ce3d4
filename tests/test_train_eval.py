"""callbacks.train_eval: train_eval/loss and /acc against an eval-mode pass computed here from
the run's own checkpoint, on one process and under 2-process DDP (gloo), with noisy labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from rescalelab.callbacks.train_eval import TrainEval
from rescalelab.data.base import TRAIN_EVAL_DEFAULT
from rescalelab.errors import ConfigError
from tests.helpers import TINY, all_runs, assert_ok, history, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["method=bn", "callbacks=train_eval", "data.label_noise=0.5", "optim.lr=0.1"]


def _by_hand(root: Path, run, overrides: list[str]) -> tuple[float, float, float]:
    """(eval-mode loss, eval-mode acc, train-mode loss) of the run's last.ckpt on the training set."""
    with initialize_config_module("rescalelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *overrides, f"paths.root={root}"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    model = instantiate(cfg.model, input_shape=dm.input_shape, num_classes=dm.num_classes,
                        norm=instantiate(cfg.norm))  # fmt: skip
    ckpt = Path(run.data.tags["rescalelab.output_dir"]) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    x, y = dm.tensors["x_train"], dm.tensors["y_train"]  # the noisy training labels
    with torch.no_grad():
        out = model.eval()(x)
        train_mode = F.cross_entropy(model.train()(x), y).item()
    loss = F.cross_entropy(out.double(), y).item()
    return loss, (out.argmax(1) == y).double().mean().item(), train_mode


def _check(root: Path, overrides: list[str]) -> None:
    (run,) = all_runs(root)
    assert run.info.status == "FINISHED"
    loss_hist = history(root, run.info.run_id, "train_eval/loss")
    acc_hist = history(root, run.info.run_id, "train_eval/acc")
    assert len(loss_hist) == len(acc_hist) == 2  # one per epoch
    # logged at the epoch's last step, like val/loss
    assert [s for s, _ in loss_hist] == [s for s, _ in history(root, run.info.run_id, "val/loss")]
    loss, acc, train_mode = _by_hand(root, run, overrides)
    assert loss_hist[-1][1] == pytest.approx(loss, rel=1e-5)
    assert acc_hist[-1][1] == pytest.approx(acc, abs=1e-6)
    # BN in train mode normalizes by the batch: a different number, so eval mode was used
    assert abs(train_mode - loss) > 1e-3 * loss


def test_train_eval_loss_is_the_eval_mode_pass_over_the_training_set(root: Path):
    overrides = [*ARGS, "trainer.max_epochs=2"]
    assert_ok(run_cli(root, *overrides))
    _check(root, overrides)


@pytest.mark.slow
def test_train_eval_under_ddp_sums_the_slices_of_both_ranks(root: Path):
    # 512 samples split 256 + 256 over 2 gloo ranks: the logged mean is the whole set's
    overrides = [*ARGS, "trainer=ddp_cpu", "trainer.max_epochs=2"]
    assert_ok(run_cli(root, *overrides))
    _check(root, overrides)


def test_train_eval_subset_is_fixed_by_the_seed_and_sized_by_train_eval_size():
    from rescalelab.data import SyntheticImages

    small = SyntheticImages(num_train=300, num_val=50, batch_size=32, train_eval_size=100)
    assert torch.equal(small.train_eval_indices(300), small.train_eval_indices(300))
    idx = small.train_eval_indices(300)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100 and bool((idx.diff() > 0).all())
    other = SyntheticImages(num_train=300, num_val=50, batch_size=32, train_eval_size=100, seed=1)
    assert not torch.equal(idx, other.train_eval_indices(300))
    default = SyntheticImages(num_train=300, num_val=50, batch_size=32)
    assert torch.equal(default.train_eval_indices(300), torch.arange(300))
    assert len(default.train_eval_indices(3 * TRAIN_EVAL_DEFAULT)) == TRAIN_EVAL_DEFAULT
    # two ranks take disjoint contiguous slices that cover the subset
    small.setup()
    parts = [torch.cat([y for _, y in small.train_eval_batches(r, 2)]) for r in (0, 1)]
    assert torch.equal(torch.cat(parts), small.tensors["y_train"][idx])


def test_bad_train_eval_keys_are_one_line_errors(root: Path):
    with pytest.raises(ConfigError, match="every_n_epochs"):
        TrainEval(every_n_epochs=0)
    proc = run_cli(root, "callbacks=train_eval", "data.train_eval_size=0")
    assert proc.returncode == 2
    assert "error: data.train_eval_size=0 is invalid" in proc.stderr
    assert all_runs(root) == []
