"""The drift instruments in process: the statistics against formulas, toy layers whose input
statistics move in known ways (a linear ramp, a step), the probe leaving every buffer as it was,
the hooks leaving the model as it was, a real 2-process gloo group against one process on the
concatenated batch, dead units, the schedule and the figures."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from rescalelab.callbacks.drift import DriftMonitor
from rescalelab.callbacks.drift import stats as ds
from rescalelab.callbacks.drift.collector import StatsCollector
from rescalelab.data import TensorDataModule
from rescalelab.errors import ConfigError
from rescalelab.geometry import layer_geometry
from rescalelab.models import SmallCNN
from rescalelab.norm import BatchNorm, Whitening
from tests.helpers import free_port

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------
# Toy problems: a layer input whose mean moves by a known amount per step


class Ramp(nn.Module):
    """x + offset; the offset moves only through the loss term -v(t)·Σ offset (SGD, lr 1)."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset.detach()


class EmaLinear(nn.Linear):
    """Stand-in for a whitened layer: buffers rescale_mean/var, an EMA (rate ρ, torch BN's
    meaning) of its inputs updated in the training forward, after the forward pre-hooks."""

    def __init__(self, n_in: int, n_out: int, rho: float) -> None:
        super().__init__(n_in, n_out)
        self.rho = rho
        self.register_buffer("rescale_mean", torch.zeros(n_in))
        self.register_buffer("rescale_var", torch.ones(n_in))
        self.register_buffer("rescale_beta2", torch.tensor(1.0))
        self.register_buffer("rescale_updates", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.rescale_mean.lerp_(x.mean(0), self.rho)
                self.rescale_var.lerp_(x.var(0), self.rho)
                self.rescale_updates += 1
        return super().forward(x)


class Toy(nn.Module):
    """The ramped input feeds a whitened stand-in and a BatchNorm, both with EMA rate ρ."""

    def __init__(self, units: int, rho: float) -> None:
        super().__init__()
        self.ramp = Ramp(units)
        self.white = EmaLinear(units, 4, rho)
        self.bn = nn.BatchNorm1d(units, momentum=rho)
        self.head = nn.Linear(units, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ramp(x)
        return self.white(x) + self.head(self.bn(x))


class ToyData(TensorDataModule):
    """x ~ N(0, 1) in ``units`` features, held as tensors (the probe reads ``x_train``)."""

    num_classes = 2

    def __init__(self, n: int, units: int, batch_size: int, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.n, self.input_shape = n, (units,)

    def load(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.n, self.input_shape[0], generator=g)
        y = torch.zeros(self.n, dtype=torch.long)
        return {"x_train": x, "y_train": y, "x_val": x[:64], "y_val": y[:64]}


class ToyPlug:
    """The norm plug's ρ (``norm.momentum``), where the monitor reads the whitening rate."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum


class ToyModule(pl.LightningModule):
    def __init__(self, units: int, rho: float, velocity: Callable[[int], float]) -> None:
        super().__init__()
        self.model, self.velocity, self.norm = Toy(units, rho), velocity, ToyPlug(rho)

    def training_step(self, batch, batch_idx):
        out = self.model(batch[0])
        # Zero gradient for every weight; offset += v(t) at the optimizer step of step t.
        return 0 * out.sum() - self.velocity(self.global_step) * self.model.ramp.offset.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def fit_toy(velocity, steps=300, units=32, batch=256, rho=0.1, **monitor) -> DriftMonitor:
    # One long epoch: probes only where probe_every says (plus the last step).
    data = ToyData(n=(steps + 1) * batch, units=units, batch_size=batch)
    cfg = dict(dense_steps=0, every_n_steps=10, probe_size=1024, probe_every=20,
               probe_epochs=10, arrays=False, figures=False)  # fmt: skip
    cfg.update(monitor)
    mon = DriftMonitor(**cfg)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, callbacks=[mon],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
    )  # fmt: skip
    trainer.fit(ToyModule(units, rho, velocity), datamodule=data)
    return mon


def series(mon: DriftMonitor, layer: str, stat: str) -> dict[int, float]:
    key = f"drift/{layer}/{stat}"
    return {s: m[key] for s, m in sorted(mon.by_step.items()) if key in m}


def steady(values: dict[int, float], start: int = 100) -> np.ndarray:
    return np.array([v for s, v in values.items() if s >= start])


# ------------------------------------------------------------------------------------------
# The statistics


@pytest.mark.parametrize("shape, unit_dim", [((64, 7), -1), ((8, 5, 6, 4), 1), ((3, 9, 7), -1)])
def test_sufficient_stats_give_mean_and_biased_variance(shape, unit_dim):
    g = torch.Generator().manual_seed(1)
    units = shape[unit_dim]
    view = [1] * len(shape)
    view[unit_dim] = units
    # |mean| = 1000 std: the shift keeps float32 sums accurate (no var = E[x²] − E[x]² here).
    x = 1000 + torch.randn(shape, generator=g) * torch.linspace(0.5, 2, units).view(view)
    dims = ds.unit_dims(len(shape), unit_dim)
    ref_m, ref_v = x.double().mean(dims), x.double().var(dims, unbiased=False)
    shift = ref_m.float() + 0.3  # the last logged mean: close, not equal
    n, s1, s2 = ds.sufficient_stats(x, shift, unit_dim)
    assert n == x.numel() // units
    m, v = ds.moments(n, s1.double().numpy(), s2.double().numpy(), shift.double().numpy())
    np.testing.assert_allclose(m, ref_m.numpy(), rtol=1e-6)
    np.testing.assert_allclose(v, ref_v.numpy(), rtol=1e-4)


def test_ema_lag_is_one_over_rho_or_one_minus_rho_over_rho():
    """An EMA under constant drift, simulated: the least-squares delay against the drifting
    mean is (1−ρ)/ρ after the update with the current batch, 1/ρ before it."""
    rho, a, steps = 0.1, 0.01, 400
    r, before, after = 0.0, [], []
    for t in range(steps):
        mu = a * t
        before.append(mu - r)
        r = (1 - rho) * r + rho * mu
        after.append(mu - r)
    u = np.full(50, a)
    for deltas, expected, flag in ((after, 9.0, True), (before, 10.0, False)):
        lag, se = ds.lag_steps(np.full(50, deltas[-1]), u, noise_sd=0.0)
        assert lag == pytest.approx(expected, rel=1e-6)
        assert lag == pytest.approx(ds.ema_lag_steps(rho, after_update=flag))
        assert se == 0


def test_batch_noise_is_one_over_n_for_independent_samples():
    g = np.random.default_rng(0)
    k, n, u = 64, 50, 40
    x = g.normal(3.0, 2.0, size=(k, n, u))
    s_m, s_lv = ds.batch_noise(x.mean(1), x.var(1), eps=1e-8)
    assert s_m == pytest.approx(1 / n, rel=0.1)
    assert s_lv == pytest.approx(2 / n, rel=0.15)  # Var(log v) ≈ 2/n for Gaussian data
    assert ds.noise_floor(1 / n, 0.1) == pytest.approx(math.sqrt(1 / n * 2 / 1.9))


def test_settle_step_is_the_first_probe_after_which_an_epoch_moves_less_than_the_threshold():
    steps = [0, 10, 20, 30, 40, 50, 60]
    means = [np.full(4, v) for v in (0.0, 0.5, 0.8, 0.85, 0.86, 0.87, 0.875)]
    var = [np.ones(4)] * len(steps)
    # epoch = 10 steps: changes 0.5, 0.3, 0.05, 0.01, 0.01, 0.005 -> settled at 30 for 0.04
    assert ds.settle_step(steps, means, var, 10, 0.04, 0.1, 1e-8) == 30
    assert ds.settle_step(steps, means, var, 10, 0.06, 0.1, 1e-8) == 20
    assert ds.settle_step(steps, means, var, 10, 0.001, 0.1, 1e-8) is None  # still moving
    # the variance counts too: a 10% jump of the std at the end (log-var 0.19) unsettles
    var2 = [*var[:-1], np.full(4, 1.21)]
    assert ds.settle_step(steps, means, var2, 10, 0.04, 0.1, 1e-8) is None
    # windows up to an epoch count, not only neighbours: with 20-step epochs (20, 40) moves 0.06
    assert ds.settle_step(steps, means, var, 10, 0.055, 0.1, 1e-8) == 20
    assert ds.settle_step(steps, means, var, 20, 0.055, 0.1, 1e-8) == 30


def test_schedule_is_dense_then_log_spaced_then_every_n():
    sch = ds.Schedule(dense_steps=10, per_decade=10, every_n_steps=50)
    assert all(t in sch for t in range(10))
    assert sorted(sch.grid) == [10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100, 126, 158, 200]
    assert 11 not in sch and 201 not in sch and 250 in sch and 300 in sch
    assert sch.count(780) == 36


def test_bad_monitor_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"callbacks.drift.probe_size=-1 is invalid"):
        DriftMonitor(probe_size=-1)
    with pytest.raises(ConfigError, match=r"callbacks.drift.metrics='some'"):
        DriftMonitor(metrics="some")


# ------------------------------------------------------------------------------------------
# Toy layers: known drift, known lag


def test_linear_ramp_gives_the_ramp_rate_and_the_ema_lag():
    a, rho = 0.02, 0.1
    mon = fit_toy(lambda t: a, rho=rho)
    for layer in ("white", "bn"):  # whitening stand-in and BatchNorm, both fed the ramp
        drift = steady(series(mon, layer, "drift_mean"))
        assert drift.mean() == pytest.approx(a, rel=0.08), layer
        # the estimate in use when the batch arrives trails by 1/ρ steps ...
        lag_steps = steady(series(mon, layer, "lag_steps"))
        assert len(lag_steps) > 10
        assert lag_steps.mean() == pytest.approx(1 / rho, abs=0.7), layer
        # ... the estimate after the step's update, against the population, by (1−ρ)/ρ
        probe_steps = steady(series(mon, layer, "lag_steps_probe"))
        assert len(probe_steps) >= 5
        assert probe_steps.mean() == pytest.approx((1 - rho) / rho, abs=1.0), layer
        # in std units: a/ρ above the noise floor
        excess = steady(series(mon, layer, "lag_mean_z_excess"))
        assert excess.mean() == pytest.approx(a / rho, rel=0.1), layer
    # the head reads the BN output: normalized, it does not drift
    assert steady(series(mon, "head", "drift_mean")).mean() < 0.2 * a


def test_stationary_input_lags_at_the_noise_floor():
    mon = fit_toy(lambda t: 0.0, steps=200)
    for layer in ("white", "bn"):
        lag = steady(series(mon, layer, "lag_mean_z"))
        floor = steady(series(mon, layer, "noise_floor"))
        assert np.mean(lag**2) / np.mean(floor**2) == pytest.approx(1.0, abs=0.25), layer
        assert floor.mean() == pytest.approx(math.sqrt(2 / 1.9 / 256), rel=0.15)
        assert steady(series(mon, layer, "drift_mean")).mean() < 0.005
        n_eff = steady(series(mon, layer, "n_eff"), start=0)
        assert np.median(n_eff) == pytest.approx(256, rel=0.3)


def test_an_abrupt_shift_gives_a_drift_spike_that_decays():
    jump, at, rho = 1.0, 100, 0.1
    mon = fit_toy(lambda t: jump if t == at else 0.0, steps=180, dense_steps=180)
    drift = series(mon, "white", "drift_mean")
    assert drift[at + 1] == pytest.approx(jump, rel=0.1)  # the forward after the step moves
    quiet = [v for s, v in drift.items() if s > 5 and s not in (at + 1,)]
    assert max(quiet) < 0.15 * jump
    lag = series(mon, "white", "lag_mean_z_excess")
    assert lag[at] < 0.1 and lag[at + 1] == pytest.approx(jump, rel=0.1)
    assert lag[at + 11] == pytest.approx(jump * (1 - rho) ** 10, abs=0.08)  # the EMA catches up
    assert max(v for s, v in lag.items() if s >= at + 40) < 0.1


# ------------------------------------------------------------------------------------------
# The probe and the hooks leave the model alone


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("norm", ["bn", "whitening"])
def test_probe_leaves_every_buffer_bit_identical(norm):
    torch.manual_seed(0)
    plug = BatchNorm() if norm == "bn" else Whitening()
    model = SmallCNN((3, 32, 32), 10, norm=plug)
    plug.prepare(model, layer_geometry(model, (3, 32, 32)))
    model.train()
    model(torch.randn(16, 3, 32, 32))  # BN buffers away from their initial values
    if norm == "whitening":
        plug.layers.initialise(model, [torch.randn(16, 3, 32, 32)])
    before = _buffers(model)
    collector = StatsCollector(model, probe_batches=2)
    collector.probe([torch.randn(16, 3, 32, 32) + 1, torch.randn(16, 3, 32, 32) * 2])
    after = _buffers(model)
    assert before.keys() == after.keys() and len(before) > 0
    for k in before:
        assert torch.equal(before[k], after[k]), k
        assert before[k].dtype == after[k].dtype
    # the probe did run: both probe banks hold counts for the first conv
    first = collector.tracked[0]
    assert first.sums[1:, 0].tolist() == [16 * 32 * 32] * 2
    if norm == "bn":  # without the restore the same forward would move them (this can fail)
        model(torch.randn(16, 3, 32, 32) + 1)
        moved = _buffers(model)
        assert any(not torch.equal(before[k], moved[k]) for k in before)
    else:  # whitening's own accumulators (not buffers) saw nothing: it is not armed
        assert all(la.count == 0 for la in plug.layers.layers)


def _hooks(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _tiny_fit(callbacks: list, seed: int = 0, norm: str = "bn", epochs: int = 2) -> nn.Module:
    from rescalelab.data import SyntheticImages
    from rescalelab.module import Classifier
    from rescalelab.optim.schedules import constant

    pl.seed_everything(seed, verbose=False)
    data = SyntheticImages(num_train=256, num_val=64, batch_size=32, seed=seed)
    plug = BatchNorm() if norm == "bn" else Whitening()
    model = SmallCNN(data.input_shape, 10, norm=plug)
    plug.prepare(model, layer_geometry(model, data.input_shape))
    optim = functools.partial(torch.optim.SGD, lr=0.05)
    sched = constant
    module = Classifier(model, 10, optim, sched, plug)
    hooks_before = _hooks(model)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert _hooks(model) == hooks_before  # every hook the monitor added is gone
    return model


def test_monitor_changes_nothing_and_removes_its_hooks():
    mon = DriftMonitor(dense_steps=100, probe_size=64, probe_every=3, figures=False)
    with_monitor = _tiny_fit([mon])
    without = _tiny_fit([])
    assert len(mon.by_step) == 16 and mon.n_probes >= 6  # it did instrument and probe
    a, b = with_monitor.state_dict(), without.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # weights and BN buffers: bit for bit
        assert torch.equal(a[k], b[k]), k


class _Recorder(pl.Callback):
    """An independent observer: the whitening μ, Var after every step's update."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, np.ndarray]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = {
            n: (m.rescale_mean.numpy().copy(), m.rescale_var.numpy().copy())
            for n, m in pl_module.model.named_modules()
            if hasattr(m, "rescale_mean")
        }


def test_with_whitening_the_lag_is_that_of_the_mu_and_var_in_use():
    rec = _Recorder()
    mon = DriftMonitor(dense_steps=100, probe_size=64, probe_every=4, figures=False)
    _tiny_fit([mon, rec], norm="whitening", epochs=1)
    layers = ("features.0", "features.4", "classifier.1", "classifier.4", "classifier.7")
    arrays = mon.array_files["epoch_000.npz"]
    eps = 1e-5
    for name in layers:
        steps = arrays[f"{name}/steps"].tolist()
        assert steps == list(range(8))
        for i, t in enumerate(steps[1:], start=1):
            # the estimates a batch is whitened with: those left by the previous step's update
            mu, var = rec.after[t - 1][name]
            np.testing.assert_array_equal(arrays[f"{name}/r_mean"][i], mu)
            np.testing.assert_array_equal(arrays[f"{name}/r_var"][i], var)
            m, v = arrays[f"{name}/m"][i].astype(float), arrays[f"{name}/v"][i].astype(float)
            lag = math.sqrt(np.mean((m - mu) ** 2 / (var + eps)))
            assert mon.by_step[t][f"drift/{name}/lag_mean_z"] == pytest.approx(lag, rel=1e-5)
            lag_lv = math.sqrt(np.mean(np.log((v + eps) / (var + eps)) ** 2))
            assert mon.by_step[t][f"drift/{name}/lag_logvar"] == pytest.approx(lag_lv, rel=1e-4)
        assert mon.record.layers[name]["rho"] == pytest.approx(0.1)  # norm.momentum
        assert f"drift/{name}/lag_mean_z_probe" in mon.by_step[4]


# ------------------------------------------------------------------------------------------
# DDP: 2 gloo ranks, reduced, equal one process on the concatenated batch


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(),
        nn.Linear(8, 3),
    )  # fmt: skip


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(12, 3, 8, 8, generator=g) * 2 + 0.5 for _ in range(2)]


def _flat(stats: dict[str, dict]) -> np.ndarray:
    """n, m, v and the dead-unit sums of every layer, in one vector."""
    keys = ("m", "v", "active")
    parts = [np.concatenate([[d["n"]], *(d[k] for k in keys if k in d)]) for d in stats.values()]
    return np.concatenate(parts)


def _collect(model: nn.Module, parts: list[torch.Tensor]) -> list[dict[str, dict]]:
    """Two instrumented steps; the second uses the shifts set by the first."""
    c = StatsCollector(model)
    out = []
    for x in parts:
        c.start_step()
        model(x)
        c.on = False
        out.append(c.gather(probe=False))
    c.remove()
    return out


def _rank(rank: int, port: int, path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        halves = [x[rank * 6 : (rank + 1) * 6] for x in _batches()]
        steps = _collect(_net(), halves)
        if rank == 0:
            np.save(path, np.stack([_flat(st) for st in steps]))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reduce_to_the_statistics_of_the_concatenated_batch(tmp_path: Path):
    import torch.multiprocessing as mp

    port = free_port()
    path = str(tmp_path / "rank0.npy")
    # fork: the ranks inherit the imported modules (spawn would re-import torch, Lightning, ...)
    mp.start_processes(_rank, args=(port, path), nprocs=2, join=True, start_method="fork")
    reduced = np.load(path)
    model = _net()
    steps = _collect(model, _batches())
    np.testing.assert_allclose(reduced, np.stack([_flat(st) for st in steps]), rtol=2e-5, atol=1e-4)
    stats = steps[1]  # the formulas, once more, on the full batch
    x = _batches()[1]
    np.testing.assert_allclose(stats["0"]["m"], x.double().mean((0, 2, 3)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        stats["0"]["v"], x.double().var((0, 2, 3), unbiased=False).numpy(), rtol=1e-4
    )


# ------------------------------------------------------------------------------------------
# Dead units


def test_dead_frac_of_a_layer_with_known_dead_units():
    lin = nn.Linear(6, 10)
    with torch.no_grad():
        lin.weight.normal_()
        lin.bias.fill_(5.0)
        lin.weight[[1, 4, 7]] = 0.0  # units 1, 4, 7: constant pre-activation -1 -> always dead
        lin.bias[[1, 4, 7]] = -1.0
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(10, 2))
    c = StatsCollector(model)
    c.start_step()
    model(torch.randn(200, 6) * 0.1)  # |w x| < 5: the other units are always alive
    c.on = False
    stats = c.gather(False)
    assert ds.dead_fraction(stats["0"]["active"]) == pytest.approx(3 / 10)
    assert "active" not in stats["2"]  # the output layer has no ReLU after it


# ------------------------------------------------------------------------------------------
# Figures


def _is_png(fig) -> bool:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    Image.open(io.BytesIO(data)).verify()
    return data.startswith(PNG) and len(data) > 5000


def test_figures_from_a_monitored_fit_and_a_warmup_sweep_are_valid_pngs():
    import pandas as pd

    from rescalelab.callbacks.drift import figures

    mon = fit_toy(lambda t: 0.01, steps=60, dense_steps=20, probe_every=10)
    table = mon.table()
    assert isinstance(table, pd.DataFrame) and {"step", "layer", "stat", "value"} <= set(table)
    meta = {"layers": ["ramp", "white", "bn", "head"], "epoch_starts": [0], "switch_step": 30,
            "rho": {"white": 0.1, "bn": 0.1}, "settle_step": {"white": 40}}  # fmt: skip
    figs = figures.run_figures(table, meta)
    assert set(figs) == {"drift_heatmap", "lag_heatmap", "lag_curves", "dead_units"}
    assert all(_is_png(f) for f in figs.values())
    runs = [
        {"k": k, "loss": (np.arange(50), np.exp(-np.arange(50) / (20 + k + s))),
         "steps_per_epoch": 10, "switch_step": 10 * k,
         "staleness": (np.linspace(0, 3, 7), np.linspace(1, 0.1, 7) / (k + 1 + s))}
        for k in (0, 1, 2) for s in (0, 1, 2)
    ]  # fmt: skip
    assert _is_png(figures.warmup_sweep(runs))
    x, y = figures.staleness(table, switch_step=30, steps_per_epoch=10)
    assert len(x) and x[0] == 0 and np.all(np.diff(x) > 0)


# ------------------------------------------------------------------------------------------
# Honest figures: no lag against unset estimates, no switch line without a switch, one
# quantity per panel


def test_whitening_lag_starts_once_its_statistics_hold_data():
    """μ = 0, Var = 1 before the first update are no estimate: no lag at step 0."""
    mon = DriftMonitor(dense_steps=100, probe_size=64, probe_every=4, figures=False)
    _tiny_fit([mon], norm="whitening", epochs=1)
    lag_steps = [s for s, m in sorted(mon.by_step.items()) if "drift/features.0/lag_mean_z" in m]
    assert lag_steps == list(range(1, 8))  # step 0 is measured (mean_z), not lagged
    assert "drift/features.0/mean_z" in mon.by_step[0]
    # BatchNorm's running statistics are what eval uses from the first step: lagged at step 0
    bn = DriftMonitor(dense_steps=100, probe_size=0, figures=False)
    _tiny_fit([bn], norm="bn", epochs=1)
    assert "drift/features.1/lag_mean_z" in bn.by_step[0]


def _switch_lines(fig) -> list[float]:
    return [
        float(line.get_xdata()[0])
        for ax in fig.axes
        for line in ax.get_lines()
        if line.get_label() == "switch"
    ]


def test_a_switch_line_only_where_bn_switched_to_whitening():
    from rescalelab.callbacks.drift import figures
    from rescalelab.callbacks.drift.monitor import switch_step
    from rescalelab.norm import BnWarmup

    plug = BnWarmup(warmup_epochs=0)  # whitening from the start: switched_at_step = 0
    model = SmallCNN((3, 32, 32), 10, norm=plug)
    plug.prepare(model, layer_geometry(model, (3, 32, 32)))
    assert plug.switched_at_step == 0 and switch_step(plug) is None
    assert switch_step(Whitening()) is None and switch_step(BatchNorm()) is None
    warm = BnWarmup(warmup_epochs=2)
    warm.switched_at_step = 16
    assert switch_step(warm) == 16

    mon = fit_toy(lambda t: 0.01, steps=40, dense_steps=20, probe_every=10)
    table = mon.table()
    meta = {"layers": ["ramp", "white", "bn", "head"], "epoch_starts": [0],
            "rho": {"white": 0.1, "bn": 0.1}, "switch_step": None}  # fmt: skip
    for build in (figures.drift_heatmap, figures.lag_heatmap, figures.lag_curves):
        assert _switch_lines(build(table, meta)) == [], build.__name__
        with_switch = build(table, {**meta, "switch_step": 30})
        assert _switch_lines(with_switch) and set(_switch_lines(with_switch)) == {31.0}


def test_the_lag_figure_shows_one_quantity_per_panel_on_one_axis():
    from rescalelab.callbacks.drift import figures

    mon = fit_toy(lambda t: 0.01, steps=60, dense_steps=20, probe_every=10)
    meta = {"layers": ["ramp", "white", "bn", "head"], "epoch_starts": [0],
            "rho": {"white": 0.1, "bn": 0.1}, "switch_step": None}  # fmt: skip
    fig = figures.lag_curves(mon.table(), meta)
    layers = ["white", "bn"]  # the layers with running estimates
    assert len(fig.axes) == len(layers) * len(figures.LAG_PANELS)  # no twin axes
    groups = [{stat for stat, _ in stats} for _, stats in figures.LAG_PANELS]
    refs = {"(1−ρ)/ρ", "1/ρ", "switch"}
    for i, ax in enumerate(fig.axes):
        labels = {line.get_label() for line in ax.get_lines()} - refs
        labels = {lab for lab in labels if not lab.startswith("_")}  # epoch-start marks
        assert labels and labels <= groups[i % len(groups)], (i, labels)
