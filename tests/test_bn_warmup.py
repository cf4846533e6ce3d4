"""norm=bn_warmup: BN folding preserves the function, the BN → whitening switch is exact, the
optimizer is rebuilt for the new parameters with the schedule continuing, resumes land in the
whitened phase, and the CLI logs the switch."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, StepLR

from rescalelab.callbacks.bn_warmup import continue_schedule
from rescalelab.data import SyntheticImages
from rescalelab.errors import ConfigError
from rescalelab.geometry import layer_geometry
from rescalelab.models import SmallCNN
from rescalelab.module import Classifier
from rescalelab.norm import BatchNorm, BnWarmup
from rescalelab.norm.bn_warmup import STATE_KEY
from rescalelab.norm.fold import fold_batchnorm
from rescalelab.validate import check_targets, validate
from tests.helpers import all_runs, assert_ok, compose_train, history, run_cli

SHAPE = (3, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """BN statistics and affine parameters far from their initial 0/1 values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(0.2 + 3 * torch.rand(n, generator=g))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class NoBiasNet(nn.Module):
    """Bias-free layers, nested modules, BatchNorm1d/2d without affine: folding adds biases."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleDict({
            "conv": nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
            "bn": nn.BatchNorm2d(4, affine=False),
        })  # fmt: skip
        self.fc = nn.Linear(4 * 16 * 16, 5, bias=False)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.block["bn"](self.block["conv"](x)))
        return self.bn(self.fc(x.flatten(1)))


@pytest.mark.parametrize("name", ["small_cnn", "alexnet", "nobias"])
def test_folding_batchnorm_preserves_eval_outputs(name):
    torch.manual_seed(0)
    if name == "small_cnn":
        model = SmallCNN(SHAPE, 10, BatchNorm())
    elif name == "alexnet":
        from rescalelab.models.alexnet import AlexNet

        model = AlexNet(SHAPE, 10, BatchNorm())
    else:
        model = NoBiasNet()
    _randomize_bn(model)
    x = torch.randn(8, *SHAPE) * 2 + 0.5
    model.eval()
    with torch.no_grad():
        before = model(x)
        pairs = fold_batchnorm(model, SHAPE)
        after = model(x)
    assert pairs and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    )
    assert _rel_err(after, before) <= 1e-5
    assert all(model.get_submodule(layer).bias is not None for layer, _ in pairs)


def test_folding_refuses_a_batchnorm_it_cannot_fold():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="cannot fold BatchNorm"):
        fold_batchnorm(model, SHAPE)


def test_switch_keeps_the_function_and_initialises_mu_var_from_the_folded_inputs():
    torch.manual_seed(0)
    plug = BnWarmup(warmup_epochs=1, init_batches=3)
    model = SmallCNN(SHAPE, 10, plug)
    plug.prepare(model, layer_geometry(model, SHAPE))
    _randomize_bn(model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, *SHAPE, generator=g), torch.randint(0, 10, (16,), generator=g))
               for _ in range(3)]  # fmt: skip
    x = torch.randn(8, *SHAPE, generator=g)
    model.eval()
    with torch.no_grad():
        out_bn = model(x)
    before, after = plug.switch_model(model, batches)
    model.eval()
    with torch.no_grad():
        out_whitened = model(x)
    assert _rel_err(out_whitened, out_bn) <= 1e-5
    assert after == pytest.approx(before, rel=1e-5)
    plain = SmallCNN(SHAPE, 10)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    # μ, Var of F84 = mean over the batches of the batch mean / unbiased variance of its inputs
    seen = []
    fc = model.classifier[1]
    handle = fc.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for xb, _ in batches:
            model(xb)
    handle.remove()
    torch.testing.assert_close(fc.rescale_mean, torch.stack([s.mean(0) for s in seen]).mean(0))
    torch.testing.assert_close(fc.rescale_var, torch.stack([s.var(0) for s in seen]).mean(0))
    assert int(fc.rescale_updates) == 3


def test_continue_schedule_puts_a_rebuilt_scheduler_at_the_old_position():
    def opt(names):
        return torch.optim.SGD(
            [{"name": n, "params": [nn.Parameter(torch.zeros(1))], "lr": lr} for n, lr in names],
            lr=1.0,
        )

    old_names, new_names = [("a", 0.4), ("b", 0.1), ("other", 0.2)], [("a", 0.4), ("b", 0.1)]
    old = LambdaLR(opt(old_names), lambda k: 1 / (1 + k))
    for _ in range(7):
        old.optimizer.step()
        old.step()
    new = LambdaLR(opt(new_names), lambda k: 1 / (1 + k))
    continue_schedule(old, new)
    assert new.last_epoch == 7
    assert [g["lr"] for g in new.optimizer.param_groups] == pytest.approx([0.4 / 8, 0.1 / 8])
    new.optimizer.step()
    new.step()
    assert [g["lr"] for g in new.optimizer.param_groups] == pytest.approx([0.4 / 9, 0.1 / 9])
    # any other scheduler: state and current stepsizes carried over by group name
    old = StepLR(opt(old_names), step_size=3, gamma=0.5)
    for _ in range(7):
        old.optimizer.step()
        old.step()
    new = StepLR(opt(new_names), step_size=3, gamma=0.5)
    continue_schedule(old, new)
    assert [g["lr"] for g in new.optimizer.param_groups] == pytest.approx([0.1, 0.025])
    for _ in range(2):
        new.optimizer.step()
        new.step()
    assert [g["lr"] for g in new.optimizer.param_groups] == pytest.approx([0.05, 0.0125])


class Recorder(pl.Callback):
    """What the Lightning loop holds at the start of every training batch."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.rows.append({
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "opt_params": {id(p) for g in opt.param_groups for p in g["params"]},
            "model_params": {id(p) for p in module.model.parameters()},
            "n_params": sum(p.numel() for p in module.model.parameters()),
            "has_bn": any(isinstance(m, nn.BatchNorm2d) for m in module.model.modules()),
            "lr": opt.param_groups[0]["lr"],
            "weight": module.model.features[0].weight.detach().clone(),
        })  # fmt: skip


def _fit(tmp: Path, max_epochs: int, ckpt_path: str | None = None):
    pl.seed_everything(0, verbose=False)
    data = SyntheticImages(num_train=256, num_val=64, batch_size=32, seed=0)
    data.prepare_data()
    data.setup("fit")
    plug = BnWarmup(warmup_epochs=1, init_batches=2)
    model = SmallCNN(SHAPE, 10, plug)
    geometry = layer_geometry(model, SHAPE)
    plug.prepare(model, geometry)
    optim = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    schedule = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.8)
    module = Classifier(model, 10, optim, schedule, plug, geometry)
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
        default_root_dir=tmp, callbacks=[recorder, pl.callbacks.ModelCheckpoint(
            dirpath=tmp / "ckpt", save_last=True, save_top_k=0)],
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, plug, recorder.rows


def test_switch_in_a_lightning_fit_rebuilds_the_optimizer_and_resumes_whitened(tmp_path):
    module, plug, rows = _fit(tmp_path, max_epochs=2)
    steps = 256 // 32
    assert plug.switched_at_step == steps
    warm, whitened = rows[:steps], rows[steps:]
    assert all(r["has_bn"] and r["opt_params"] == r["model_params"] for r in warm)
    assert all(not r["has_bn"] and r["opt_params"] == r["model_params"] for r in whitened)
    plain = sum(p.numel() for p in SmallCNN(SHAPE, 10).parameters())
    assert whitened[0]["n_params"] == plain < warm[0]["n_params"]
    # The schedule continues: StepLR(3, 0.8) at step k gives 0.1 · 0.8^(k // 3), across the switch.
    for r in rows:
        assert r["lr"] == pytest.approx(0.1 * 0.8 ** (r["step"] // 3)), r["step"]
    # Training goes on after the switch.
    assert not torch.equal(whitened[0]["weight"], module.model.features[0].weight)
    assert all(
        int(m.rescale_updates) >= 2 for m in module.model.modules() if hasattr(m, "rescale_updates")
    )

    # Resume from the checkpoint taken after the switch: a fresh BN model is rebuilt folded.
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved[STATE_KEY]["switched_at_step"] == steps
    assert not any("running_mean" in k for k in saved["state_dict"])
    updates_saved = int(saved["state_dict"]["model.classifier.1.rescale_updates"])
    resumed, rplug, rrows = _fit(tmp_path, max_epochs=3, ckpt_path=str(ckpt))
    assert rplug.switched_at_step == steps
    assert [r["step"] for r in rrows] == list(range(2 * steps, 3 * steps))
    assert all(not r["has_bn"] and r["opt_params"] == r["model_params"] for r in rrows)
    torch.testing.assert_close(rrows[0]["weight"], saved["state_dict"]["model.features.0.weight"])
    assert int(resumed.model.classifier[1].rescale_updates) > updates_saved
    for r in rrows:
        assert r["lr"] == pytest.approx(0.1 * 0.8 ** (r["step"] // 3))


def test_warmup_zero_is_whitening_from_the_start():
    plug = BnWarmup(warmup_epochs=0)
    model = SmallCNN(SHAPE, 10, plug)
    plug.prepare(model, layer_geometry(model, SHAPE))
    assert plug.switched_at_step == 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert hasattr(model.features[0], "rescale_mean")


def test_warmup_must_leave_whitened_epochs():
    cfg = compose_train("norm=bn_warmup", "norm.warmup_epochs=2", "trainer.max_epochs=2")
    with pytest.raises(
        ConfigError, match=r"norm.warmup_epochs=2 is invalid: expected < trainer.max_epochs=2"
    ):
        validate(cfg)
    validate(compose_train("norm=bn_warmup", "norm.warmup_epochs=1", "trainer.max_epochs=2"))
    with pytest.raises(ConfigError, match="norm.warmup_epochs=-1 is invalid"):
        check_targets(compose_train("norm=bn_warmup", "norm.warmup_epochs=-1"))  # BnWarmup's own


def test_cli_bn_warmup_logs_the_switch(root):
    proc = run_cli(root, "norm=bn_warmup", "norm.warmup_epochs=1", "trainer.max_epochs=2")
    assert_ok(proc)
    (run,) = all_runs(root)
    assert run.info.status == "FINISHED"
    assert run.data.params["norm._target_"] == "rescalelab.norm.BnWarmup"
    steps = 512 // 64
    rid = run.info.run_id
    assert history(root, rid, "norm/switch_step") == [(steps, float(steps))]
    ((s1, before),) = history(root, rid, "norm/loss_before_switch")
    ((s2, after),) = history(root, rid, "norm/loss_after_switch")
    assert s1 == s2 == steps and math.isfinite(before)
    assert after == pytest.approx(before, rel=1e-5)
    loss_steps = [s for s, _ in history(root, rid, "train/loss")]
    assert max(loss_steps) > steps  # training went on after the switch
    ckpt = Path(run.data.tags["rescalelab.output_dir"]) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved[STATE_KEY]["switched_at_step"] == steps
    state = saved["state_dict"]
    assert not any("running_mean" in k for k in state)
    assert "model.classifier.1.rescale_mean" in state
