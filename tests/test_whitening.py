"""norm=whitening against the lecture's formulas: form (b) (the implementation) vs form (a) (the
literal reparametrized layer, written here), the hand-computed δw/δb, the statistics, β from
share × fanin, the fan-in stepsizes, a learning comparison and the CLI end to end."""

from __future__ import annotations

import functools
import math
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from rescalelab.errors import ConfigError
from rescalelab.geometry import LayerGeometry, layer_geometry
from rescalelab.models import SmallCNN
from rescalelab.norm import Whitening
from rescalelab.norm.whitening import WhitenedLayers, fused_sums, shifted_sums, transform_dense

# small_cnn on 3x32x32, by hand: (share, fanin) of C6(5x5), C16(5x5), F84, F16, F10
SMALL_CNN = {
    "features.0": (28 * 28, 3 * 5 * 5),
    "features.4": (10 * 10, 6 * 5 * 5),
    "classifier.1": (1, 16 * 10 * 10),
    "classifier.4": (1, 84),
    "classifier.7": (1, 16),
}


pytestmark = pytest.mark.usefixtures("one_thread")


LAYERS = {
    "linear": lambda: nn.Linear(7, 5),
    "conv_pad_stride": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
    "conv_pad2_stride3": lambda: nn.Conv2d(2, 3, 4, stride=3, padding=2),
    "conv_groups": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
}


def _case(kind: str, dtype=torch.float64):
    """A layer with non-trivial w, b, inputs x with offsets and scales, and μ, Var, β² given."""
    # A stable seed per kind (str hash() changes per process): a failure reproduces, the layer's
    # initial weights included (drawn from a forked global generator, left as it was).
    seed = zlib.crc32(kind.encode())
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = LAYERS[kind]()
    n_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    shape = (16, n_in) if isinstance(layer, nn.Linear) else (5, n_in, 9, 8)
    bcast = (1, -1) if isinstance(layer, nn.Linear) else (1, -1, 1, 1)
    offsets = torch.linspace(-2, 3, n_in, dtype=dtype)
    scales = torch.linspace(0.2, 4, n_in, dtype=dtype)
    x = torch.randn(shape, generator=g, dtype=dtype) * scales.view(bcast) + offsets.view(bcast)
    model = nn.Sequential(layer)
    share = 1 if isinstance(layer, nn.Linear) else 20
    fanin = n_in if isinstance(layer, nn.Linear) else layer.weight[0].numel()
    wl = WhitenedLayers(model, {"0": LayerGeometry("0", share, fanin)}, eps=1e-5)
    model.to(dtype)
    with torch.no_grad():
        layer.rescale_mean.copy_(offsets + 0.3 * torch.randn(n_in, generator=g, dtype=dtype))
        layer.rescale_var.copy_(scales**2 * (0.5 + torch.rand(n_in, generator=g, dtype=dtype)))
    return model, layer, wl, x


def _out_grad(y: torch.Tensor) -> torch.Tensor:
    """A fixed g = ∂ℓ/∂y per example (E = mean over examples of Σ_j y_j g_j)."""
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)


def _literal_layer(layer: nn.Module, mu, var, beta2: float, eps: float):
    """Form (a): store v, v_0 with w_ij = α_i β_j v_ij, b_j = β_j v_0j − Σ_i μ_i w_ij.

    Returns (v, v0, forward, to_wb), ``forward(x)`` = β (v_0 + Σ_i α_i (x_i − μ_i) v_ij) on the
    zero-padded input, ``to_wb(v, v0)`` maps back to (w, b).
    """
    alpha = 1.0 / torch.sqrt(var + eps)
    beta = math.sqrt(beta2)
    w, b = layer.weight.detach(), layer.bias.detach()
    if isinstance(layer, nn.Linear):
        a_w, mu_w = alpha.view(1, -1), mu.view(1, -1)
    else:
        g = layer.groups
        per_out = layer.out_channels // g
        a_w = alpha.view(g, -1).repeat_interleave(per_out, 0)[:, :, None, None]
        mu_w = mu.view(g, -1).repeat_interleave(per_out, 0)[:, :, None, None]
    dims = tuple(range(1, w.dim()))
    v = (w / (a_w * beta)).clone().requires_grad_(True)
    v0 = ((b + (mu_w * w).sum(dims)) / beta).clone().requires_grad_(True)

    def forward(x, v=v, v0=v0, alpha=alpha, mu=mu):
        if isinstance(layer, nn.Linear):
            return beta * (v0 + (alpha * (x - mu)) @ v.T)
        p = layer.padding
        xp = F.pad(x, (p[1], p[1], p[0], p[0]))  # zero padding, then z = α (x − μ)
        z = alpha.view(1, -1, 1, 1) * (xp - mu.view(1, -1, 1, 1))
        y = F.conv2d(z, v, stride=layer.stride, groups=layer.groups)
        return beta * (y + v0.view(1, -1, 1, 1))

    def to_wb(v, v0):
        w_new = a_w * beta * v
        return w_new, beta * v0 - (mu_w * w_new).sum(dims)

    return v, v0, forward, to_wb


@pytest.mark.parametrize("kind", list(LAYERS))
def test_one_step_of_form_b_equals_form_a(kind):
    model, layer, wl, x = _case(kind)
    eta = 0.3
    mu, var = layer.rescale_mean.clone(), layer.rescale_var.clone()
    beta2 = float(layer.rescale_beta2)
    v, v0, forward_a, to_wb = _literal_layer(layer, mu, var, beta2, wl.eps)

    y = layer(x)
    torch.testing.assert_close(forward_a(x), y, rtol=1e-10, atol=1e-10)  # same function
    g = _out_grad(y)
    (y * g).sum().div(len(x)).backward()
    wl.transform_gradients()
    w_b = layer.weight.detach() - eta * layer.weight.grad
    b_b = layer.bias.detach() - eta * layer.bias.grad

    (forward_a(x) * g).sum().div(len(x)).backward()
    w_a, b_a = to_wb(v.detach() - eta * v.grad, v0.detach() - eta * v0.grad)
    torch.testing.assert_close(w_b, w_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b_b, b_a, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(w_b, layer.weight.detach() - eta * _plain_grad(layer, x, g))


def _plain_grad(layer: nn.Module, x, g):
    w = layer.weight.detach().clone().requires_grad_(True)
    y = (
        F.linear(x, w, layer.bias)
        if isinstance(layer, nn.Linear)
        else layer._conv_forward(x, w, layer.bias)
    )
    (y * g).sum().div(len(x)).backward()
    return w.grad


@pytest.mark.parametrize("kind", list(LAYERS))
def test_step_equals_the_lecture_formula_computed_by_hand(kind):
    """δw_ij = ⟨β_j² g_j α_i² (x_i − μ_i)⟩, δb_j = ⟨β_j² g_j⟩ − Σ_i μ_i δw_ij."""
    model, layer, wl, x = _case(kind)
    mu, var, beta2 = layer.rescale_mean, layer.rescale_var, float(layer.rescale_beta2)
    alpha2 = 1.0 / (var + wl.eps)
    y = layer(x)
    g = _out_grad(y)
    (y * g).sum().div(len(x)).backward()
    wl.transform_gradients()
    n = len(x)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            dw = beta2 * torch.einsum("nj,ni->ji", g, alpha2 * (x - mu)) / n
            db = beta2 * g.sum(0) / n - dw @ mu
        else:
            # i = (c, u, v): the input patch each output position reads, zero padded, unfolded.
            kh, kw = layer.kernel_size
            cols = F.unfold(x, (kh, kw), padding=layer.padding, stride=layer.stride)
            c_of_i = torch.arange(layer.in_channels).repeat_interleave(kh * kw)
            centered = alpha2[c_of_i].view(1, -1, 1) * (cols - mu[c_of_i].view(1, -1, 1))
            gj = g.flatten(2)  # [n, out, positions]
            G, cin_g = layer.groups, layer.in_channels // layer.groups
            per_out = layer.out_channels // G
            dw = torch.empty_like(layer.weight)
            for j in range(layer.out_channels):
                grp = j // per_out
                rows = slice(grp * cin_g * kh * kw, (grp + 1) * cin_g * kh * kw)
                dw[j] = (torch.einsum("np,nip->i", gj[:, j], centered[:, rows]) / n).view(
                    cin_g, kh, kw
                )
            dw *= beta2
            mu_w = torch.stack(
                [mu[c_of_i].view(-1, kh, kw)[j // per_out * cin_g : (j // per_out + 1) * cin_g]
                 for j in range(layer.out_channels)]
            )  # fmt: skip
            db = beta2 * gj.sum((0, 2)) / n - (mu_w * dw).sum((1, 2, 3))
    torch.testing.assert_close(layer.weight.grad, dw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, db, rtol=1e-10, atol=1e-12)


def test_layer_without_bias_is_scaled_only():
    layer = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    model = nn.Sequential(layer)
    wl = WhitenedLayers(model, {"0": LayerGeometry("0", 49, 27)})
    with torch.no_grad():
        layer.rescale_mean.fill_(2.0)
        layer.rescale_var.copy_(torch.tensor([0.5, 2.0, 8.0]))
    x = torch.randn(2, 3, 7, 7)
    layer(x).square().sum().backward()
    raw = layer.weight.grad.clone()
    wl.transform_gradients()
    alpha2 = 1.0 / (layer.rescale_var + wl.eps)
    expected = raw * (49 * 27) ** -0.5 * alpha2.view(1, -1, 1, 1)
    torch.testing.assert_close(layer.weight.grad, expected)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 5)
    )


def test_whitening_with_mu_0_alpha_1_beta_1_is_plain_training():
    eps = 2.0**-10  # 1 − eps + eps == 1 exactly: α = 1
    nets = [_mlp(0), _mlp(0)]
    plug = Whitening(eps=eps)
    plug.prepare(nets[1], layer_geometry(nets[1], (2, 6, 6)))
    for m in plug.layers.layers:
        m.module.rescale_mean.zero_()
        m.module.rescale_var.fill_(1.0 - eps)
        m.module.rescale_beta2.fill_(1.0)
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in nets]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(8, 2, 6, 6, generator=g) + 3, torch.randint(0, 5, (8,), generator=g)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            if net is nets[1]:
                plug.before_optimizer_step(net)  # statistics never armed: they stay 0 and 1
            opt.step()
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(next(nets[0].parameters()), next(_mlp(0).parameters()))


def test_beta_of_small_cnn_from_share_and_fanin_by_hand():
    model = SmallCNN((3, 32, 32), 10)
    Whitening().prepare(model, layer_geometry(model, (3, 32, 32)))
    for name, (share, fanin) in SMALL_CNN.items():
        layer = model.get_submodule(name)
        assert float(layer.rescale_beta2) == pytest.approx((share * fanin) ** -0.5, rel=1e-6)
        # β_j = (share × fanin)^(−1/4): its square is the fan-in rule, applied once
        assert math.sqrt(float(layer.rescale_beta2)) == pytest.approx((share * fanin) ** -0.25)
        assert layer.rescale_mean.shape == layer.rescale_var.shape
        assert int(layer.rescale_updates) == 0
    assert len([m for m in model.modules() if hasattr(m, "rescale_beta2")]) == 5


def test_layer_scale_fanin_gives_each_layer_base_times_inverse_sqrt_share_fanin():
    from rescalelab.optim import build_optimizer, param_groups  # imports Lightning: not in DDP

    model = SmallCNN((3, 32, 32), 10)
    geometry = layer_geometry(model, (3, 32, 32))
    sgd = functools.partial(torch.optim.SGD, lr=0.2, momentum=0.0, weight_decay=0.0)
    groups = functools.partial(param_groups, layer_scale="fanin", decay_exclude=False)
    opt = build_optimizer(sgd, groups, model, geometry)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert set(lrs) == set(SMALL_CNN)
    for name, (share, fanin) in SMALL_CNN.items():
        assert lrs[name] == pytest.approx(0.2 / math.sqrt(share * fanin), rel=1e-12)
        group = next(g for g in opt.param_groups if g["name"] == name)
        layer = model.get_submodule(name)
        assert {id(p) for p in group["params"]} == {id(layer.weight), id(layer.bias)}


def _feed(plug: Whitening, model: nn.Module, batches, start_step: int = 0) -> None:
    """What the LightningModule does per step: arm, forward (train mode), backward, update."""
    model.train()
    for k, x in enumerate(batches):
        plug.on_train_batch_start(model, x, start_step + k)
        model(x).sum().backward()
        plug.before_optimizer_step(model)
        model.zero_grad()


@pytest.mark.parametrize("sums", [fused_sums, shifted_sums], ids=["cuda_fused", "cpu_shifted"])
@pytest.mark.parametrize(
    "shape, conv, channels_last",
    [((6, 3, 5, 4), True, False), ((6, 3, 5, 4), True, True), ((9, 7), False, False),
     ((2, 4, 7), False, False)],
    ids=["conv", "conv_channels_last", "linear", "linear_3d"],
)  # fmt: skip
def test_both_statistics_paths_give_the_shifted_sums_of_their_input(
    sums, shape, conv, channels_last
):
    """The CUDA path (one ``var_mean``) and the CPU path (one temporary ``x − c``) are the same
    sums; both run here on a CPU, so the GPU's formulas are checked where no GPU is lent: per
    input, ``Σ(x − c)``, ``Σ(x − c)²`` and the number of nonzero entries, against float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(shape, generator=g) * 2 + 0.5)  # zeros for the count, an offset
    if channels_last:  # a conv input that is not contiguous: reduced over (0, 2, 3) at once
        x = x.to(memory_format=torch.channels_last)
    n_in = x.shape[1] if conv else x.shape[-1]
    c = torch.linspace(0.3, 1.1, n_in)  # the shift: the current μ, per input
    dims = (0, 2, 3) if conv else tuple(range(x.dim() - 1))
    d = x.double() - (c.double().view(1, -1, 1, 1) if conv else c.double())
    expected = torch.stack((d.sum(dims), d.square().sum(dims), (x != 0).sum(dims).double()))
    got = sums(x, c, conv, True)
    assert got.shape == (3, n_in) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums(x, c, conv, False), got[:2])


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_transform_with_beta2_as_a_tensor_equals_it_as_a_number_and_the_formula(conv):
    """``transform_dense`` keeps β² a tensor on a GPU (no host sync) and a number on a CPU: both
    give ``δw_ij = β² α_i² (∂E/∂w_ij − μ_i ∂E/∂b_j)``, ``δb_j = β² ∂E/∂b_j − Σ_i μ_i δw_ij``."""
    g = torch.Generator().manual_seed(4)
    shape = (5, 3, 2, 2) if conv else (5, 3)
    taps = 4 if conv else 1
    gw, gb = torch.randn(shape, generator=g), torch.randn(5, generator=g)
    scale = torch.rand(3, generator=g) + 0.5  # β² α_i², per input
    mu = torch.randn(3, generator=g).repeat_interleave(taps)  # μ per column (c, u, v)
    beta2 = 0.3
    w_cols = gw.reshape(5, -1)
    dw = (w_cols - torch.outer(gb, mu)) * scale.repeat_interleave(taps)
    db = beta2 * gb - dw @ mu
    for b2 in (beta2, torch.tensor(beta2)):
        w2, b2_grad = gw.clone(), gb.clone()
        transform_dense(w2, b2_grad, scale, mu, b2)
        torch.testing.assert_close(w2.reshape(5, -1), dw)
        torch.testing.assert_close(b2_grad, db)
    w2 = gw.clone()  # no centering (a layer without a trainable bias): the scale only
    transform_dense(w2, None, scale, None, beta2)
    torch.testing.assert_close(w2.reshape(5, -1), w_cols * scale.repeat_interleave(taps))


def test_statistics_start_from_the_first_batches_and_converge_to_the_true_moments():
    torch.manual_seed(0)
    lin, conv = nn.Linear(4, 3), nn.Conv2d(3, 2, 3)
    means, stds = torch.tensor([-3.0, 0.0, 2.0, 10.0]), torch.tensor([0.1, 1.0, 3.0, 0.5])
    g = torch.Generator().manual_seed(3)

    def batch():
        return torch.randn(64, 4, generator=g) * stds + means

    plug = Whitening(momentum=0.02, init_batches=4, interval=1)
    model = nn.Sequential(lin)
    plug.prepare(model, layer_geometry(model, (4,)))
    first = [batch() for _ in range(4)]
    _feed(plug, model, first[:1])
    torch.testing.assert_close(lin.rescale_mean, first[0].mean(0))  # not from 0 and 1
    torch.testing.assert_close(lin.rescale_var, first[0].var(0))
    _feed(plug, model, first[1:], start_step=1)
    stacked = torch.stack(first)
    torch.testing.assert_close(lin.rescale_mean, stacked.mean(1).mean(0))
    torch.testing.assert_close(lin.rescale_var, stacked.var(1).mean(0))
    _feed(plug, model, [batch() for _ in range(600)], start_step=4)
    assert int(lin.rescale_updates) == 604
    # EMA noise: std ≈ σ sqrt(ρ/((2−ρ) B)) ≈ 0.013 σ for the mean, 0.018 relative for Var
    assert ((lin.rescale_mean - means).abs() / stds).max() < 0.06
    assert ((lin.rescale_var / stds**2) - 1).abs().max() < 0.09

    # Conv2d: per input channel, pooled over batch and positions
    cplug = Whitening(momentum=0.05, init_batches=2)
    cmodel = nn.Sequential(conv)
    cplug.prepare(cmodel, layer_geometry(cmodel, (3, 8, 8)))
    cm, cs = torch.tensor([1.0, -2.0, 5.0]), torch.tensor([2.0, 0.5, 1.0])
    xs = [torch.randn(16, 3, 8, 8, generator=g) * cs.view(1, -1, 1, 1) + cm.view(1, -1, 1, 1)
          for _ in range(200)]  # fmt: skip
    _feed(cplug, cmodel, xs)
    assert ((conv.rescale_mean - cm).abs() / cs).max() < 0.05
    assert ((conv.rescale_var / cs**2) - 1).abs().max() < 0.05


class _WithUnused(nn.Module):
    """A conv and two Linear layers in the forward, and a Linear the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Linear(5, 2)
        )
        self.unused = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each used layer's input for ``x``, pooled per input channel/feature: [n, n_in]."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, a, name=name: seen.__setitem__(
                name, a[0].transpose(0, 1).reshape(a[0].shape[1], -1).T if a[0].dim() == 4 else a[0]
            )
        )
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {k: v.detach().clone() for k, v in seen.items()}


def test_statistics_of_every_layer_follow_a_dtype_move_and_a_checkpoint_load():
    """The layers' μ and Var are views of one flat tensor per quantity (one update for all
    layers): after ``model.to(float64)`` and after a state dict is loaded into a fresh model,
    each layer's buffers must still be the ones that are updated, a layer the forward never
    calls must keep its initial state, and every layer must match its own inputs' moments."""
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(6, 3, 8, 8, generator=g) * 2 + 1 for _ in range(3)]
    torch.manual_seed(0)
    model = _WithUnused()
    plug = Whitening(init_batches=8)
    plug.prepare(model, layer_geometry(model, (3, 8, 8)))
    seen = []
    _feed(plug, model, xs[:1])
    seen.append(_inputs(model, xs[0]))
    model.to(torch.float64)  # replaces every buffer: the statistics must follow
    _feed(plug, model, [xs[1].double()], start_step=1)
    seen.append(_inputs(model, xs[1].double()))
    for name, m in model.named_modules():
        if name == "unused":
            assert int(m.rescale_updates) == 0 and m.rescale_mean.dtype == torch.float64
            torch.testing.assert_close(m.rescale_mean, torch.zeros(7, dtype=torch.float64))
            torch.testing.assert_close(m.rescale_var, torch.ones(7, dtype=torch.float64))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            # init_batches: the plain average of the first two batches' mean and variance
            mean = (seen[0][name].double().mean(0) + seen[1][name].mean(0)) / 2
            var = (seen[0][name].double().var(0) + seen[1][name].var(0)) / 2
            assert m.rescale_mean.dtype == torch.float64 and int(m.rescale_updates) == 2
            torch.testing.assert_close(m.rescale_mean, mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.rescale_var, var, rtol=1e-5, atol=1e-6)

    # A fresh model whose buffers are loaded from the state dict continues identically.
    torch.manual_seed(0)
    fresh = _WithUnused()
    fresh_plug = Whitening(init_batches=8)
    fresh_plug.prepare(fresh, layer_geometry(fresh, (3, 8, 8)))
    fresh.to(torch.float64)
    fresh_plug.on_load_checkpoint(None, {})  # what Classifier.on_load_checkpoint calls first
    fresh.load_state_dict(model.state_dict())
    _feed(plug, model, [xs[2].double()], start_step=2)
    _feed(fresh_plug, fresh, [xs[2].double()], start_step=2)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        if name.endswith(("rescale_mean", "rescale_var", "rescale_updates")):
            assert torch.equal(a, b), name
    assert int(fresh.net[0].rescale_updates) == 3


def test_a_channels_last_model_gets_the_same_statistics_and_transformed_gradients():
    """``trainer.channels_last=true`` (the GPU option) stores conv weights and activations NHWC:
    the statistics then reduce a non-contiguous input and the transform takes its general path
    (``_transform_one``, a strided weight gradient). Both must give what the contiguous model
    gives, step after step."""
    g = torch.Generator().manual_seed(12)
    xs = [torch.randn(6, 3, 8, 8, generator=g) * 2 + 1 for _ in range(3)]
    models, plugs = [], []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = _WithUnused()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        plug = Whitening(init_batches=2)
        plug.prepare(model, layer_geometry(model, (3, 8, 8)))
        models.append(model)
        plugs.append(plug)
    assert not models[1].net[0].weight.is_contiguous()
    for k, x in enumerate(xs):
        grads = []
        for model, plug, fmt in zip(models, plugs, (torch.contiguous_format, torch.channels_last)):
            model.train()
            plug.on_train_batch_start(model, x, k)
            model(x.contiguous(memory_format=fmt)).square().sum().backward()
            plug.before_optimizer_step(model)
            grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            )
            model.zero_grad()
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)
        for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
            if name.endswith(("rescale_mean", "rescale_var", "rescale_updates")):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_statistics_schedule_interval_and_no_collection_outside_training():
    model = nn.Sequential(nn.Linear(3, 2))
    plug = Whitening(interval=3, init_batches=2)
    plug.prepare(model, layer_geometry(model, (3,)))
    lin = model[0]
    xs = [torch.randn(8, 3) + k for k in range(10)]
    _feed(plug, model, xs)
    # steps 0, 1 (the first init_batches), then 3, 6, 9
    assert int(lin.rescale_updates) == 5
    before = lin.rescale_mean.clone()
    model.eval()
    plug.on_train_batch_start(model, xs[0], 12)  # armed, but an eval forward must not count
    model(torch.full((8, 3), 100.0))
    model.train()
    model(xs[0])
    model(xs[0]).sum().backward()
    plug.before_optimizer_step(model)
    assert int(lin.rescale_updates) == 6
    expected = 0.9 * before + 0.1 * xs[0].mean(0)  # two forwards of the same batch
    torch.testing.assert_close(lin.rescale_mean, expected)


def test_changing_statistics_leaves_the_function_unchanged_form_b_and_form_a_as_documented():
    model, layer, wl, x = _case("conv_pad_stride")
    out = layer(x).detach()
    w = layer.weight.detach().clone()
    wl.arm()
    layer(x * 3 + 1)  # a very different batch moves μ, Var
    wl.update()
    assert torch.equal(layer.weight, w)
    torch.testing.assert_close(layer(x), out, rtol=0, atol=0)
    # Form (a): v fixed while μ, α move changes the function; the documented re-adjustment
    # v' = v α β / (α' β'), v'_0 = (b + Σ μ' w)/β' restores it.
    mu, var = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)
    v, v0, forward_a, _ = _literal_layer(layer, mu, var, 0.25, wl.eps)
    mu2, var2 = layer.rescale_mean.clone(), layer.rescale_var.clone()
    a1, a2 = 1 / torch.sqrt(var + wl.eps), 1 / torch.sqrt(var2 + wl.eps)
    with torch.no_grad():
        torch.testing.assert_close(forward_a(x), out)
        moved = forward_a(x, mu=mu2, alpha=a2)
        assert (moved - out).abs().max() > 1e-2
        v2 = v * (a1 / a2).view(1, -1, 1, 1)  # β unchanged
        v02 = (layer.bias + (mu2.view(1, -1, 1, 1) * w).sum((1, 2, 3))) / 0.5
        torch.testing.assert_close(forward_a(x, v=v2, v0=v02, mu=mu2, alpha=a2), out)


def test_model_with_nothing_to_whiten_is_a_clear_error():
    with pytest.raises(ConfigError, match="norm=whitening is invalid for this model: it has no"):
        Whitening().prepare(nn.Sequential(nn.ReLU(), nn.Tanh()), {})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"momentum": 0.0}, "norm.momentum=0.0 is invalid"), ({"interval": 0}, "norm.interval=0"),
     ({"init_batches": 0}, "norm.init_batches=0"), ({"eps": -1.0}, "norm.eps=-1.0")],
)  # fmt: skip
def test_bad_whitening_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Whitening(**kwargs)


def _train(norm: str, lr: float, data, epochs: int, interval: int = 2) -> float:
    """Plain loop on an overparametrised MLP; returns the final full-batch training loss."""
    x, y = data
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 4))  # fmt: skip
    plug = Whitening(momentum=0.1, init_batches=4, interval=interval) if norm != "none" else None
    if plug:
        plug.prepare(net, layer_geometry(net, (20,)))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    step = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            if plug:
                plug.on_train_batch_start(net, x[idx], step)
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            if plug:
                plug.before_optimizer_step(net)
            opt.step()
            step += 1
    with torch.no_grad():
        loss = F.cross_entropy(net(x), y).item()
    return loss if math.isfinite(loss) else float("inf")


def test_whitening_trains_faster_than_plain_sg_at_each_ones_best_stepsize():
    """The lecture's experiment in miniature: badly scaled, offset inputs, random labels,
    a network that can memorise them; same epochs, best stepsize of a 2x grid for each."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 1, 20)
    x = torch.randn(256, 20, generator=g) * scales + 5.0
    y = torch.randint(0, 4, (256,), generator=g)
    grid = [2.0**k for k in range(-9, 5)]
    best = {
        (norm, k): min(_train(norm, lr, (x, y), epochs=15, interval=k) for lr in grid)
        for norm, k in (("none", 0), ("whitening", 1), ("whitening", 2))
    }
    none = best[("none", 0)]
    # statistics every step (the lecture's setting) and at the default interval (2)
    assert best[("whitening", 1)] < 0.5 * none, best
    assert best[("whitening", 2)] < 0.8 * none, best


def test_cli_whitening_run_records_statistics_in_the_checkpoint(root: Path):
    from tests.helpers import all_runs, assert_ok, history, run_cli  # mlflow: not in DDP workers

    proc = run_cli(root, "norm=whitening", "norm.interval=3", "norm.init_batches=2",
                   "trainer.max_epochs=2", "optim.lr=0.2")  # fmt: skip
    assert_ok(proc)
    (run,) = all_runs(root)
    assert run.info.status == "FINISHED"
    assert run.data.params["norm._target_"] == "rescalelab.norm.Whitening"
    assert run.data.params["norm.interval"] == "3"
    losses = [v for _, v in history(root, run.info.run_id, "train/loss")]
    assert all(math.isfinite(v) for v in losses)
    ckpt_path = Path(run.data.tags["rescalelab.output_dir"]) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt_path, weights_only=False)["state_dict"]
    # 512/64 = 8 steps per epoch, 16 steps: updates at 0, 1, then every 3rd: 3, 6, 9, 12, 15
    for name, (share, fanin) in SMALL_CNN.items():
        assert int(state[f"model.{name}.rescale_updates"]) == 7
        assert float(state[f"model.{name}.rescale_beta2"]) == pytest.approx(
            (share * fanin) ** -0.5, rel=1e-6
        )
    assert not any("running_mean" in k for k in state)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
        plug = Whitening(init_batches=1)
        plug.prepare(model, layer_geometry(model, (3, 6, 6)))
        x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 2 + 1
        mine = x[rank * 4 : (rank + 1) * 4] if rank == 0 else x[4:] * 3  # different shards
        _feed(plug, model, [mine])
        torch.save({k: v for k, v in model.state_dict().items() if "rescale" in k}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_statistics_are_all_reduced_across_ddp_replicas(tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers import free_port  # here: the spawned workers import this module

    port = free_port()
    out = str(tmp_path / "stats")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    states = [torch.load(f"{out}.{r}") for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # = the statistics of the global batch (both shards) in one process
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    plug = Whitening(init_batches=1)
    plug.prepare(model, layer_geometry(model, (3, 6, 6)))
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 2 + 1
    _feed(plug, model, [torch.cat([x[:4], x[4:] * 3])])
    for key, value in model.state_dict().items():
        if "rescale" in key:
            torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6)


class PluginNet(nn.Module):
    """A model outside rescalelab's zoo: nested modules, a grouped bias-free conv, no plug."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.body = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)])
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.body[0](self.stem(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("name", ["small_cnn", "lenet", "alexnet", "plugin"])
def test_whitening_trains_every_model_made_of_conv_and_linear(name):
    from hydra.utils import instantiate

    from rescalelab.geometry import rescalable_layers

    torch.manual_seed(0)
    shape = (3, 32, 32)
    plug = Whitening(init_batches=2)
    if name == "plugin":
        model = PluginNet()
    else:
        cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / f"{name}.yaml")
        model = instantiate(cfg, input_shape=shape, num_classes=10, norm=plug)
    plug.prepare(model, layer_geometry(model, shape))
    layers = rescalable_layers(model)
    geometry = layer_geometry(model, shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    for step in range(2):
        plug.on_train_batch_start(model, x, step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        plug.before_optimizer_step(model)
        opt.step()
        assert math.isfinite(loss.item())
    for lname, layer in layers:
        assert int(layer.rescale_updates) == 2, lname
        assert float(layer.rescale_beta2) == pytest.approx(geometry[lname].scale)
        assert torch.isfinite(layer.weight).all()
