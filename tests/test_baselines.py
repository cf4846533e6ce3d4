"""The comparison baselines checked against their definitions (docs/baselines.md).

In-process checks on the real objects built from the shipped configs: weight norm's
``‖w_j‖ = g_j``, batch renorm equal to BatchNorm at ``r_max = 1, d_max = 0`` and clipping at its
relaxed limits, AdamW's decoupled decay, SGD's Nesterov momentum, warmup_cosine's closed form,
Muon's routing of matrices and vectors, ResNet-20's size, and the exact BN → whitening switch on
its residual blocks and projection shortcuts.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from rescalelab.geometry import layer_geometry
from rescalelab.models import ResNet20, SmallCNN
from rescalelab.norm import BatchNorm, BatchRenormPlug, BnWarmup, GroupNorm, WeightNorm
from rescalelab.norm.batch_renorm import BatchRenorm
from rescalelab.norm.fold import batchnorm_pairs
from rescalelab.norm.weight_norm import MeanOnlyBatchNorm
from rescalelab.optim import build_optimizer, build_scheduler
from tests.helpers import compose_train

SHAPE = (3, 32, 32)

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def _sgd_steps(model: nn.Module, cfg, steps: int = 3) -> torch.optim.Optimizer:
    opt = build_optimizer(
        instantiate(cfg.optim), instantiate(cfg.param_groups), model, layer_geometry(model, SHAPE)
    )
    for k in range(steps):
        x, y = _data(seed=k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


# -- weight normalization ------------------------------------------------------------------------
def test_weight_norm_keeps_each_units_norm_equal_to_its_gain_while_training():
    cfg = compose_train("method=weightnorm", "optim.lr=0.5", "optim.weight_decay=0.01",
                        "param_groups.decay_exclude=true", check=True)  # fmt: skip
    torch.manual_seed(0)
    plug = WeightNorm()
    model = SmallCNN(SHAPE, 10, norm=plug)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}  # fmt: skip
    plug.prepare(model, layer_geometry(model, SHAPE))
    x, _ = _data()
    with torch.no_grad():  # at the start g_j = ||w_j||: the function is the initial network's
        for name, w in before.items():
            assert torch.allclose(model.get_submodule(name).weight, w, atol=1e-6)
    opt = _sgd_steps(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    for name in before:
        layer = model.get_submodule(name)
        g = layer.parametrizations.weight.original0  # the gain, one per output unit
        v = layer.parametrizations.weight.original1
        w = layer.weight.detach()
        norms = w.flatten(1).norm(dim=1)
        assert torch.allclose(norms, g.detach().flatten(), rtol=1e-5, atol=1e-7), name
        want = (
            g.detach().flatten(1)
            * v.detach().flatten(1)
            / v.detach().flatten(1).norm(dim=1, keepdim=True)
        )
        assert torch.allclose(w.flatten(1), want, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(w, before[name], atol=1e-4)  # it trained
        # the gain is a normalization parameter: no weight decay with decay_exclude
        assert any(p is g for p in groups[f"{name}.no_decay"]["params"])
        assert [p is v for p in groups[name]["params"]] == [True]
    assert sum(len(gr["params"]) for gr in opt.param_groups) == len(list(model.parameters()))
    # mean-only BN: in training mode every channel's batch mean is its bias
    mobn = next(m for m in model.modules() if isinstance(m, MeanOnlyBatchNorm))
    t = torch.randn(16, mobn.num_features, 5, 5) * 3 + 2
    out = mobn.train()(t)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), mobn.bias.detach(), atol=1e-5)
    assert torch.allclose(out - t, (out - t)[:1, :, :1, :1].expand_as(t), atol=1e-5)


def test_weight_norm_without_mean_only_bn_places_nothing_after_the_layers():
    plug = WeightNorm(mean_only_bn=False)
    model = ResNet20(SHAPE, 10, norm=plug)
    assert not any(isinstance(m, MeanOnlyBatchNorm) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))


# -- batch renormalization -----------------------------------------------------------------------
def _pair(channels: int, **kw):
    torch.manual_seed(1)
    bn, brn = nn.BatchNorm2d(channels), BatchRenorm(channels, **kw)
    with torch.no_grad():
        for m in (bn, brn):
            m.weight.copy_(torch.linspace(0.5, 2.0, channels))
            m.bias.copy_(torch.linspace(-1.0, 1.0, channels))
            m.running_mean.copy_(torch.linspace(-3.0, 3.0, channels))  # far from the batches
            m.running_var.copy_(torch.linspace(0.1, 9.0, channels))
    return bn, brn


def test_batch_renorm_with_r_max_1_and_d_max_0_is_batchnorm_in_training_mode():
    bn, brn = _pair(4, r_max=1.0, d_max=0.0, relax_start=0, r_relax_steps=0, d_relax_steps=0)
    for k in range(4):
        x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(k)) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn(xa), brn(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        w = torch.randn_like(ya)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(brn, name), getattr(bn, name))
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(brn.bias.grad, bn.bias.grad)
    x = torch.randn(6, 4, 5, 5)
    torch.testing.assert_close(brn.eval()(x), bn.eval()(x), rtol=1e-5, atol=1e-5)  # eval: BN's
    # 1-D inputs (after a Linear) as BatchNorm1d
    bn1, brn1 = nn.BatchNorm1d(3), BatchRenorm(3, r_max=1.0, d_max=0.0)
    z = torch.randn(10, 3) * 4
    torch.testing.assert_close(brn1(z), bn1(z), rtol=1e-5, atol=1e-5)


def test_batch_renorm_clips_r_and_d_at_limits_relaxed_on_the_schedule():
    kw = {"r_max": 3.0, "d_max": 5.0, "relax_start": 10, "r_relax_steps": 40, "d_relax_steps": 20}
    _, brn = _pair(4, **kw)
    for k, (r_want, d_want) in {
        0: (1, 0),
        10: (1, 0),
        20: (1.5, 2.5),
        30: (2, 5),
        60: (3, 5),
    }.items():
        brn.num_batches_tracked.fill_(k)
        r_lim, d_lim = brn.limits()
        assert float(r_lim) == pytest.approx(r_want) and float(d_lim) == pytest.approx(d_want)
    brn.num_batches_tracked.fill_(20)  # r_max 1.5, d_max 2.5
    x = torch.randn(64, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.5
    mu, var0 = brn.running_mean.clone(), brn.running_var.clone()
    y = brn.train()(x)
    m, v = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    sb, s = (v + 1e-5).sqrt(), (var0 + 1e-5).sqrt()
    r = (sb / s).clamp(1 / 1.5, 1.5)
    d = ((m - mu) / s).clamp(-2.5, 2.5)
    assert (r == 1 / 1.5).any() or (r == 1.5).any()  # some channel is clipped
    assert ((d.abs() - 2.5).abs() < 1e-6).any()
    sh = (1, -1, 1, 1)
    want = ((x - m.view(sh)) / sb.view(sh) * r.view(sh) + d.view(sh)) * brn.weight.view(sh)
    torch.testing.assert_close(y, want + brn.bias.view(sh), rtol=1e-5, atol=1e-5)
    assert int(brn.num_batches_tracked) == 21


# -- optimizers ---------------------------------------------------------------------------------------
def test_adamw_decays_the_weights_apart_from_the_gradient():
    """AdamW: w₁ = w₀(1 − αλ) − α ĝ/(|ĝ| + ε); Adam's L2 would feed λw₀ into the moments."""
    lr, wd = 0.01, 0.1
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -4.0]]))
        model.bias.copy_(torch.tensor([2.0, -1.0]))
    cfg = compose_train("optim=adamw", f"optim.lr={lr}", f"optim.weight_decay={wd}",
                        "param_groups.decay_exclude=true", check=True)  # fmt: skip
    opt = build_optimizer(instantiate(cfg.optim), instantiate(cfg.param_groups), model, None)
    assert type(opt) is torch.optim.AdamW
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    grads = []
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        x, t = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), t).backward()
        grads.append((model.weight.grad.clone(), model.bias.grad.clone()))
        opt.step()
    # the closed form of three AdamW steps from the gradients alone
    b1, b2, eps = 0.9, 0.999, 1e-8
    for p0, idx, decay in ((w0, 0, wd), (b0, 1, 0.0)):
        p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        for k, gr in enumerate(grads, start=1):
            g = gr[idx]
            p = p * (1 - lr * decay)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
        got = model.weight if idx == 0 else model.bias
        torch.testing.assert_close(got.detach(), p, rtol=1e-6, atol=1e-7)
    # with a zero gradient only the decay acts: w ← w (1 − αλ)
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = model.weight.detach().clone()
    state = {k: v.clone() for k, v in opt.state[model.weight].items() if torch.is_tensor(v)}
    opt.step()
    m, v, k = state["exp_avg"] * b1, state["exp_avg_sq"] * b2, 4
    want = before * (1 - lr * wd) - lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
    torch.testing.assert_close(model.weight.detach(), want, rtol=1e-6, atol=1e-7)


def test_sgd_honours_nesterov():
    """Nesterov: b_k = μ b_{k−1} + g_k, w ← w − α (g_k + μ b_k) (torch's form)."""
    cfg = compose_train(
        "optim=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true", check=True
    )
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    model = nn.Module()
    model.register_parameter("w", w)
    opt = build_optimizer(instantiate(cfg.optim), instantiate(cfg.param_groups), model, None)
    assert all(g["nesterov"] for g in opt.param_groups)
    p, buf = w.detach().clone(), None
    for _ in range(3):
        opt.zero_grad()
        (w**4).sum().backward()
        g = 4 * p**3
        buf = g if buf is None else 0.9 * buf + g
        p = p - 0.1 * (g + 0.9 * buf)
        opt.step()
        torch.testing.assert_close(w.detach(), p)
    heavy = compose_train("optim=sgd", "optim.lr=0.1", "optim.momentum=0.9", check=True)
    assert not build_optimizer(
        instantiate(heavy.optim), instantiate(heavy.param_groups), model, None
    ).param_groups[0]["nesterov"]


def test_muon_orthogonalizes_matrices_and_steps_vectors_with_adamw():
    cfg = compose_train("method=muon", "optim.lr=0.01", check=True)
    torch.manual_seed(0)
    model = SmallCNN(SHAPE, 10)
    opt = build_optimizer(
        instantiate(cfg.optim), instantiate(cfg.param_groups), model, layer_geometry(model, SHAPE)
    )
    assert type(opt).__name__ == "Muon"
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        step = (w0[name] - p.detach()) / 0.01
        if p.dim() == 1:  # AdamW's first step: ĝ/(|ĝ| + ε) = sign(g)
            assert torch.allclose(step, grads[name].sign(), atol=1e-3), name
            continue
        # U Vᵀ of the flattened gradient (the first momentum), × sqrt(max(1, rows/cols)):
        # the singular values of its leading directions are ≈ 1 (Newton–Schulz, bf16)
        m, g = step.flatten(1), grads[name].flatten(1)
        sv = torch.linalg.svdvals(m) / max(1.0, m.shape[0] / m.shape[1]) ** 0.5
        sg = torch.linalg.svdvals(g)
        lead = int((sg > 0.1 * sg[0]).sum())
        assert float(sv[:lead].min()) > 0.6 and float(sv.max()) < 1.3, (name, sv[:lead])


# -- warmup_cosine -----------------------------------------------------------------------------------
def _closed_form(k: int, warmup: int, period: int, start: float, final: float) -> float:
    if k < warmup:
        return start + (1 - start) * k / warmup
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (period - warmup)))


@pytest.mark.parametrize(
    ("overrides", "groups", "warmup", "final"),
    [
        (["schedule.warmup_epochs=1.5"], (0.1, 0.025), 15, 0.0),  # two groups: ratios kept
        (["schedule.warmup_epochs=2", "schedule.final_factor=0.1", "schedule.start_factor=0.2"],
         (0.1,), 20, 0.1),
        (["schedule.warmup_epochs=0"], (0.1, 0.05), 0, 0.0),
    ],
)  # fmt: skip
def test_warmup_cosine_follows_its_closed_form(overrides, groups, warmup, final):
    cfg = compose_train("schedule=warmup_cosine", *overrides, check=True)
    start = cfg.schedule.start_factor
    params = [nn.Parameter(torch.zeros(1)) for _ in groups]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, groups)])
    sched = build_scheduler(instantiate(cfg.schedule), opt, total_steps=40, total_epochs=4)[
        "scheduler"
    ]
    for k in range(40):  # every step, the milestone and the last one included
        want = _closed_form(k, warmup, 40, start, final)
        for g, base in zip(opt.param_groups, groups):
            assert g["lr"] == pytest.approx(base * want, rel=1e-9, abs=1e-12), k
        opt.step()
        sched.step()


def test_warmup_cosine_refuses_what_it_cannot_do():
    from rescalelab.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"schedule.warmup_epochs=5 is invalid with trainer.max_epochs=5"
    ):
        compose_train(
            "method=sgd_tuned", "schedule.warmup_epochs=5", "trainer.max_epochs=5", check=True
        )
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (1, 2)])
    cfg = compose_train(
        "schedule=warmup_cosine",
        "schedule.final_factor=0.1",
        "schedule.warmup_epochs=1",
        check=True,
    )
    with pytest.raises(ConfigError, match="schedule.final_factor=0.1 is invalid with per-group"):
        build_scheduler(instantiate(cfg.schedule), opt, total_steps=40, total_epochs=4)


# -- ResNet-20 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shortcut", "count"), [("projection", 272_474), ("pad", 269_722)])
def test_resnet20_has_about_027m_parameters(shortcut, count):
    cfg = compose_train("model=resnet20", f"model.shortcut={shortcut}", "norm=bn", check=True)
    model = ResNet20(SHAPE, 10, norm=BatchNorm(), shortcut=cfg.model.shortcut)
    n = sum(p.numel() for p in model.parameters())
    assert n == count
    assert abs(n - 270_000) / 270_000 < 0.01
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 + (2 if shortcut == "projection" else 0)  # 6n+1 convs (+2 shortcuts)
    assert len(batchnorm_pairs(model, SHAPE)) == len(convs)  # a norm after every conv
    assert all(c.bias is None for c in convs)  # BN's shift makes a conv bias redundant


def test_resnet20_takes_every_norm_plug():
    x, _ = _data(4)
    for plug in (GroupNorm(groups=8), BatchRenormPlug(), WeightNorm()):
        model = ResNet20(SHAPE, 10, norm=plug)
        plug.prepare(model, layer_geometry(model, SHAPE))
        assert model(x).shape == (4, 10)
    assert [m.num_groups for m in ResNet20(SHAPE, 10, norm=GroupNorm(8)).modules()
            if isinstance(m, nn.GroupNorm)][:1] == [8]  # fmt: skip


def test_bn_warmup_switch_on_resnet20_keeps_the_function():
    """Fold every BN (after the block convs and the 1×1 projections), whiten: same outputs."""
    torch.manual_seed(0)
    plug = BnWarmup(warmup_epochs=1, init_batches=2)
    model = ResNet20(SHAPE, 10, norm=plug)
    plug.prepare(model, layer_geometry(model, SHAPE))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for k in range(5):  # move the weights, γ, β and the running statistics away from init
        x, y = _data(seed=k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    batches = [_data(16, seed=10 + i) for i in range(2)]
    model.eval()
    with torch.no_grad():
        outs = [model(x) for x, _ in batches]
    before, after = plug.switch_model(model, batches)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    model.eval()
    with torch.no_grad():
        for (x, _), out in zip(batches, outs):
            err = float((model(x) - out).abs().max() / out.abs().max())
            assert err < 1e-5
    assert after == pytest.approx(before, rel=1e-5)
    # whitening now transforms the gradients of all 22 layers (21 convs + fc)
    assert len(plug.whitening.layers.layers) == 22
