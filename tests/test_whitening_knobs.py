"""The knobs for whitening's α (norm.eps_mode, norm.max_scale, norm.min_active) against their
formulas, and the revived-unit blow-up they exist for: with the lecture's defaults a dead input
(Var ≈ 0) gets β²α² ≈ β²/ε and one SG step blows the loss up when it revives; each knob bounds
that step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rescalelab.errors import ConfigError
from rescalelab.geometry import LayerGeometry
from rescalelab.norm import Whitening
from rescalelab.norm.bn_warmup import BnWarmup
from rescalelab.norm.whitening import WhitenedLayers
from tests.helpers import all_runs, assert_ok, free_port, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1e-5
BETA2 = 8**-0.5  # β² of the second layer: share 1, fanin 8


def _net() -> nn.Sequential:
    """4 → 8 (ReLU) → 3 with hidden unit 0 dead: zero weights and bias −1, so it outputs 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        net[0].weight[0].zero_()
        net[0].bias[0] = -1.0
    return net


def _geometry() -> dict[str, LayerGeometry]:
    return {"0": LayerGeometry("0", 1, 4), "2": LayerGeometry("2", 1, 8)}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (64,), generator=g
    )


def _revived_step(lr: float = 0.1, **knobs) -> dict[str, float]:
    """Statistics from 4 batches with unit 0 dead, then unit 0 revives and SG takes one step."""
    net, (x, y) = _net(), _data()
    wl = WhitenedLayers(net, _geometry(), **{"eps": EPS, **knobs})
    wl.initialise(net, list(x.split(16)))
    layer = wl.layers[1]
    var0 = float(layer.module.rescale_var[0])
    scale = wl.input_scale(layer)
    with torch.no_grad():  # the unit revives: it now fires on about half of the samples
        net[0].weight[0].fill_(1.0)
        net[0].bias[0] = 0.0
    before = F.cross_entropy(net(x), y)
    net.zero_grad()
    before.backward()
    wl.transform_gradients()
    col = net[2].weight.grad.abs().amax(0)  # largest |δw_ij| of each input column i
    with torch.no_grad():
        for p in net.parameters():
            p -= lr * p.grad
        after = F.cross_entropy(net(x), y)
    return {
        "var0": var0,
        "scale0": float(scale[0]),
        "median": float(scale.median()),
        "col_ratio": float(col[0] / col[1:].median()),
        "before": before.item(),
        "after": float(after),
    }


def test_revived_unit_blows_up_with_the_lecture_defaults():
    r = _revived_step()
    assert r["var0"] == 0.0  # dead during the statistics
    assert r["scale0"] == pytest.approx(BETA2 / EPS)  # α² = 1/ε
    assert r["scale0"] > 1e3 * r["median"]
    assert r["col_ratio"] > 1e4  # its weights take a step > 10^4 times the others'
    assert r["after"] > 100 * r["before"]  # and one SG step blows the loss up


@pytest.mark.parametrize(
    "knobs, bound",
    [
        ({"max_scale": 10.0}, 10.0),  # β²α_0² = 10 × median exactly
        ({"eps_mode": "relative", "eps": 0.1}, None),  # ε = 0.1 × mean Var
        ({"min_active": 0.05}, None),  # unit 0 kept μ = 0, Var = 1 (never active)
    ],
    ids=["max_scale", "relative_eps", "min_active"],
)
def test_each_knob_bounds_the_revived_unit_update(knobs, bound):
    r = _revived_step(**knobs)
    assert r["scale0"] < 100 * r["median"]
    if bound is not None:
        assert r["scale0"] == pytest.approx(bound * r["median"])
    assert r["col_ratio"] < 1e3  # the defaults: > 1e4 (its gradient is larger too)
    assert r["after"] < 2 * r["before"]  # no blow-up (the defaults: > 100x)


def _layer(bias: bool = False, **knobs) -> tuple[nn.Linear, WhitenedLayers]:
    lin = nn.Linear(6, 2, bias=bias).double()
    wl = WhitenedLayers(nn.Sequential(lin), {"0": LayerGeometry("0", 1, 6)}, eps=EPS, **knobs)
    with torch.no_grad():
        lin.rescale_var.copy_(torch.tensor([0.0, 1e-3, 0.5, 1.0, 2.0, 4.0]))
    return lin, wl


def _applied_scale(lin: nn.Linear, wl: WhitenedLayers) -> torch.Tensor:
    """The factor the transform applied to each column (bias-free layer: δw = β²α² ∂E/∂w)."""
    x = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lin.zero_grad()
    lin(x).square().sum().backward()
    raw = lin.weight.grad.clone()
    wl.transform_gradients()
    return (lin.weight.grad / raw)[0]


def test_eps_mode_relative_is_eps_times_the_mean_input_variance():
    lin, wl = _layer(eps_mode="relative")  # β² = (1 × 6)^(−1/2)
    var = lin.rescale_var.clone()
    expected = 6**-0.5 / (var + EPS * var.mean())
    assert torch.allclose(wl.input_scale(wl.layers[0]), expected, rtol=1e-6)
    assert torch.allclose(_applied_scale(lin, wl), expected.double(), rtol=1e-6)
    with torch.no_grad():  # every input constant: ε falls back to eps itself
        lin.rescale_var.zero_()
    wl.invalidate()
    assert torch.allclose(wl.input_scale(wl.layers[0]), torch.full((6,), 6**-0.5 / EPS))


def test_max_scale_clips_at_max_scale_times_the_layer_median():
    lin, wl = _layer(max_scale=3.0)
    plain = 6**-0.5 / (lin.rescale_var.clone() + EPS)
    median = plain.median()  # torch's lower median of the 6 values: that of Var = 1
    assert float(median) == pytest.approx(6**-0.5 / (1.0 + EPS))
    expected = torch.minimum(plain, 3.0 * median)
    assert expected[0] == expected[1] == pytest.approx(3.0 * float(median))  # clipped
    assert torch.equal(expected[2:], plain[2:])  # the others untouched
    assert torch.allclose(_applied_scale(lin, wl), expected.double(), rtol=1e-6)
    _, off = _layer()
    assert torch.allclose(off.input_scale(off.layers[0]), plain)  # knob off: the lecture's α


def test_min_active_freezes_mu_and_var_of_rarely_active_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64).abs() + 0.1
    x[2:, 0] = 0.0  # input 0 active in 2 of 16 samples (12.5 %)
    x[:, 1] = 0.0  # input 1 never active
    runs = {}
    for knob in (None, 0.25):
        lin = nn.Linear(6, 2).double()
        wl = WhitenedLayers(nn.Sequential(lin), {"0": LayerGeometry("0", 1, 6)},
                            init_batches=1, min_active=knob)  # fmt: skip
        with torch.no_grad():
            lin.rescale_mean.fill_(0.7)
            lin.rescale_var.fill_(2.0)
            lin.rescale_updates.fill_(1)  # past init: μ ← 0.9 μ + 0.1 m
        wl.invalidate()
        wl.arm()
        lin(x)
        wl.update()
        runs[knob] = (lin.rescale_mean.clone(), lin.rescale_var.clone())
    (m0, v0), (m1, v1) = runs[None], runs[0.25]
    assert torch.allclose(m0, 0.9 * 0.7 + 0.1 * x.mean(0).float())  # the plain rule moves all
    assert torch.allclose(v0, 0.9 * 2.0 + 0.1 * x.var(0).float())
    assert torch.equal(m1[:2], torch.full((2,), 0.7)) and torch.equal(v1[:2], torch.full((2,), 2.0))
    assert torch.allclose(m1[2:], m0[2:]) and torch.allclose(v1[2:], v0[2:])  # active: same rule


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps_mode": "batch"}, "norm.eps_mode='batch' is invalid: expected one of"),
        ({"max_scale": 0.5}, "norm.max_scale=0.5 is invalid: expected null or a number >= 1"),
        ({"min_active": 0.0}, "norm.min_active=0.0 is invalid: expected null or a fraction"),
        ({"min_active": 1.5}, "norm.min_active=1.5 is invalid"),
    ],
)
def test_bad_knobs_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Whitening(**kwargs)
    with pytest.raises(ConfigError, match=message):
        BnWarmup(**kwargs)


def test_bn_warmup_passes_the_knobs_to_its_whitening():
    plug = BnWarmup(eps_mode="relative", max_scale=4.0, min_active=0.1).whitening
    assert (plug.eps_mode, plug.max_scale, plug.min_active) == ("relative", 4.0, 0.1)


def test_cli_whitening_with_every_knob_runs_and_logs_them(root: Path):
    proc = run_cli(root, "method=whitening", "norm.eps_mode=relative", "norm.max_scale=10",
                   "norm.min_active=0.05", "optim.lr=0.1")  # fmt: skip
    assert_ok(proc)
    (run,) = all_runs(root)
    p = run.data.params
    assert (p["norm.eps_mode"], p["norm.max_scale"], p["norm.min_active"]) == (
        "relative", "10", "0.05",
    )  # fmt: skip
    proc = run_cli(root, "method=whitening", "norm.max_scale=0.5")
    assert proc.returncode == 2
    assert "error: norm.max_scale=0.5 is invalid" in proc.stderr


def _ddp_min_active(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        lin, x = _min_active_case()
        wl = WhitenedLayers(nn.Sequential(lin), {"0": LayerGeometry("0", 1, 6)},
                            init_batches=1, min_active=0.25)  # fmt: skip
        wl.arm()
        lin(x[rank * 8 : (rank + 1) * 8])  # each rank its half of the batch
        wl.update()
        torch.save((lin.rescale_mean, lin.rescale_var), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _min_active_case() -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand(16, 6, generator=torch.Generator().manual_seed(4)) + 0.1
    x[:, 0] = 0.0
    x[0, 0] = x[8, 0] = 1.0  # input 0: active in 1 of each rank's 8 samples (2 of 16 in all)
    x[:6, 1] = 0.0  # input 1: active in 2 of rank 0's 8 samples but 10 of 16 in all
    return nn.Linear(6, 2), x


@pytest.mark.slow
def test_min_active_counts_the_global_batch_under_ddp(tmp_path):
    import torch.multiprocessing as mp

    port = free_port()
    out = str(tmp_path / "stats")
    mp.spawn(_ddp_min_active, args=(2, port, out), nprocs=2, join=True)
    (m0, v0), (m1, v1) = (torch.load(f"{out}.{r}") for r in range(2))
    assert torch.equal(m0, m1) and torch.equal(v0, v1)
    lin, x = _min_active_case()  # one process, the global batch
    wl = WhitenedLayers(nn.Sequential(lin), {"0": LayerGeometry("0", 1, 6)},
                        init_batches=1, min_active=0.25)  # fmt: skip
    wl.arm()
    lin(x)
    wl.update()
    torch.testing.assert_close(m0, lin.rescale_mean)
    torch.testing.assert_close(v0, lin.rescale_var)
    assert m0[0] == 0.0 and v0[0] == 1.0  # frozen: 2/16 < 0.25
    assert m0[1] > 0  # 10/16 active in all: updated, though rank 0 alone saw 2/8
