"""``callbacks.stepsizes``: the logged effective stepsizes against their formulas.

The CLI runs train small_cnn for one epoch (8 steps); the numbers logged at the epoch's last
step are recomputed from what the run left in ``last.ckpt`` (whitening buffers, optimizer
state), which is the state they were measured on (nothing changes them after the last step).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rescalelab.callbacks.stepsizes import StepsizeMonitor
from rescalelab.geometry import layer_geometry
from rescalelab.norm import Whitening
from tests.helpers import all_runs, assert_ok, history, run_cli

STEPS = 8


def _one_run(root: Path, *overrides: str) -> tuple[str, dict[str, float], dict]:
    proc = run_cli(root, "callbacks=stepsizes", "trainer.log_every_n_steps=2", *overrides)
    assert_ok(proc)
    (run,) = all_runs(root)
    (ckpt_path,) = Path(run.data.params["paths.output_dir"]).glob("checkpoints/last.ckpt")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return run.info.run_id, run.data.metrics, ckpt


def _whitened_layers(state: dict) -> list[str]:
    return [k[: -len(".rescale_var")] for k in state if k.endswith(".rescale_var")]


def test_whitening_logs_lr_beta2_alpha2_and_the_near_zero_variance_inputs(root):
    lr, eps, threshold = 0.2, 1e-5, 0.05
    rid, metrics, ckpt = _one_run(
        root, "norm=whitening", f"optim.lr={lr}", f"callbacks.stepsizes.var_threshold={threshold}"
    )
    state = ckpt["state_dict"]
    layers = _whitened_layers(state)
    assert len(layers) == 5
    total_low, top = 0, 0.0
    for prefix in layers:
        name = prefix.removeprefix("model.")
        var, beta2 = state[f"{prefix}.rescale_var"], float(state[f"{prefix}.rescale_beta2"])
        step = lr * beta2 / (var.double() + eps)  # α β² α_i² per input i
        for stat, want in (("min", step.min()), ("median", step.median()), ("max", step.max())):
            assert metrics[f"stepsizes/{name}/{stat}"] == pytest.approx(float(want), rel=1e-5)
        low = int((var < threshold).sum())
        assert metrics[f"stepsizes/{name}/low_var"] == low
        assert metrics[f"stepsizes/{name}/max_scale"] == pytest.approx(
            float((beta2 / (var.double() + eps)).max()), rel=1e-5
        )
        total_low, top = total_low + low, max(top, float((beta2 / (var.double() + eps)).max()))
        ratio = history(root, rid, f"stepsizes/{name}/update_ratio")
        assert [s for s, _ in ratio] == [STEPS - 1] and 0 < ratio[0][1] < 1
        # the early warning at every logging step (1, 3, 5, 7), the stepsize once an epoch
        assert [s for s, _ in history(root, rid, f"stepsizes/{name}/low_var")] == [1, 3, 5, 7]
        assert [s for s, _ in history(root, rid, f"stepsizes/{name}/median")] == [STEPS - 1]
    assert total_low > 0  # the input images' channels sit well above, ReLU outputs may not
    assert metrics["stepsizes/low_var"] == total_low
    assert metrics["stepsizes/max_scale"] == pytest.approx(top, rel=1e-5)


def test_fanin_stepsize_is_the_group_stepsize_lr_over_sqrt_share_fanin(root):
    rid, metrics, _ = _one_run(root, "method=sg_fanin", "optim.lr=0.3")
    for name in ("features.0", "classifier.7"):
        lr = dict(history(root, rid, f"train/lr/{name}"))[STEPS - 1]
        assert lr < 0.3  # the fan-in multipliers are < 1
        for stat in ("min", "median", "max"):
            assert metrics[f"stepsizes/{name}/{stat}"] == pytest.approx(lr, rel=1e-6)
        assert f"stepsizes/{name}/low_var" not in metrics  # nothing whitened


def test_adam_logs_the_realised_per_coordinate_step(root):
    lr = 1e-3
    _, metrics, ckpt = _one_run(root, "method=adam", f"optim.lr={lr}")
    opt = ckpt["optimizer_states"][0]
    seen = []
    for group in opt["param_groups"]:
        if group["name"] not in ("features.0", "classifier.1"):
            continue
        seen.append(group["name"])
        s = opt["state"][group["params"][0]]  # the layer's weight
        t, beta2 = float(s["step"]), group["betas"][1]
        step = lr / ((s["exp_avg_sq"].double() / (1 - beta2**t)).sqrt() + group["eps"])
        for stat, want in (("min", step.min()), ("median", step.median()), ("max", step.max())):
            assert metrics[f"stepsizes/{group['name']}/{stat}"] == pytest.approx(
                float(want), rel=1e-4
            )
        assert metrics[f"stepsizes/{group['name']}/max"] > 10 * lr  # small v: steps far above α
    assert seen == ["features.0", "classifier.1"]


def test_update_ratio_is_the_norm_of_the_step_over_the_norm_of_the_weight():
    model = nn.Sequential(nn.Linear(4, 3))
    plug = Whitening(eps=1e-5)
    plug.prepare(model, layer_geometry(model, (4,)))
    layer = model[0]
    layer.rescale_var.copy_(torch.tensor([1e-6, 0.5, 2.0, 1e-4]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = StepsizeMonitor(var_threshold=1e-3)
    monitor._before = {"0": layer.weight.detach().clone()}
    with torch.no_grad():
        layer.weight.add_(0.01)
    delta = math.sqrt(12) * 0.01
    rec = monitor.measure(
        SimpleNamespace(optimizers=[opt]), SimpleNamespace(model=model, norm=plug)
    )
    assert rec["stepsizes/0/update_ratio"] == pytest.approx(
        delta / float(monitor._before["0"].norm()), rel=1e-5
    )
    beta2 = float(layer.rescale_beta2)
    assert rec["stepsizes/0/low_var"] == 2  # 1e-6 and 1e-4
    assert rec["stepsizes/0/max_scale"] == pytest.approx(beta2 / (1e-6 + 1e-5), rel=1e-5)
    assert rec["stepsizes/0/max"] == pytest.approx(0.1 * beta2 / (1e-6 + 1e-5), rel=1e-5)
    assert rec["stepsizes/0/min"] == pytest.approx(0.1 * beta2 / (2.0 + 1e-5), rel=1e-5)


def test_a_bad_threshold_is_one_line_and_exit_2(root):
    proc = run_cli(root, "callbacks=stepsizes", "callbacks.stepsizes.var_threshold=0")
    assert proc.returncode == 2
    assert "callbacks.stepsizes.var_threshold=0 is invalid: expected a number > 0" in proc.stderr
    assert all_runs(root) == []
