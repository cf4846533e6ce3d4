"""``callbacks=bn_warmup``: the numbers around the BN → whitening switch, checked against the
training loss the run logged, the drift records, and an exact computation on given losses."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from rescalelab.callbacks.bn_warmup import BNWarmupMonitor
from rescalelab.callbacks.drift import DriftMonitor
from rescalelab.data import SyntheticImages
from rescalelab.errors import ConfigError
from rescalelab.models import SmallCNN
from rescalelab.module import Classifier
from rescalelab.norm import BatchNorm
from rescalelab.optim.schedules import constant
from tests.helpers import all_runs, assert_ok, child_runs, cli_env, client, history, run_cli

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_cli_bn_warmup_sweep_logs_the_switch_loss_spike_lags_and_dead_units(root: Path):
    # 512 examples / 64 = 8 steps per epoch. k=1: one BN epoch, the switch at step 8, then two
    # whitened epochs; k=0: whitening from the first step. One parent run, two children.
    proc = run_cli(
        root, "-m", "norm=bn_warmup", "norm.warmup_epochs=0,1", "callbacks=bn_warmup",
        "trainer.max_epochs=3", "trainer.log_every_n_steps=1",
    )  # fmt: skip
    assert_ok(proc)
    runs = {r.data.params["norm.warmup_epochs"]: r for r in child_runs(root)}
    assert set(runs) == {"0", "1"}
    # the switch step is logged once, by the switch, as norm/switch_step: k=0 never switches
    assert not {"norm/switch_step", "bn_warmup/switch_step"} & set(runs["0"].data.metrics)
    assert "bn_warmup/loss_before" not in runs["0"].data.metrics  # no warm-up: nothing before
    run = runs["1"]
    rid, m = run.info.run_id, run.data.metrics
    assert history(root, rid, "norm/switch_step") == [(8, 8.0)] and "bn_warmup/switch_step" not in m
    loss = dict(history(root, rid, "train/loss"))  # every step (log_every_n_steps=1)
    assert m["bn_warmup/loss_before"] == pytest.approx(loss[7], rel=1e-6)
    assert m["bn_warmup/loss_after"] == pytest.approx(loss[8], rel=1e-6)
    before = np.mean([loss[s] for s in range(8)])  # window 10 > 8 warm-up steps: all of them
    assert m["bn_warmup/loss_before_mean"] == pytest.approx(before, rel=1e-6)
    after = {s: loss[s] for s in range(8, 16)}  # the epoch after the switch
    peak = max(after, key=after.get)
    assert m["bn_warmup/max_spike_step"] == peak
    assert m["bn_warmup/max_spike"] == pytest.approx(after[peak] - before, rel=1e-5)
    assert m["bn_warmup/max_spike_ratio"] == pytest.approx(after[peak] / before, rel=1e-6)
    # lags right before (BN's running statistics, probe at step 7) and right after (whitening
    # mu, Var of the folded layers, probe at step 8), per layer and the worst layer
    assert m["bn_warmup/lag_mean_z_probe_before_step"] == 7
    assert m["bn_warmup/lag_mean_z_probe_after_step"] == 8
    assert m["bn_warmup/features.1/lag_mean_z_probe_before"] == pytest.approx(
        dict(history(root, rid, "drift/features.1/lag_mean_z_probe"))[7]
    )
    assert m["bn_warmup/features.0/lag_mean_z_probe_after"] == pytest.approx(
        dict(history(root, rid, "drift/features.0/lag_mean_z_probe"))[8]
    )
    bn_layers = ("features.1", "features.5", "classifier.2", "classifier.5")
    assert m["bn_warmup/lag_logvar_probe_before"] == pytest.approx(
        max(m[f"bn_warmup/{n}/lag_logvar_probe_before"] for n in bn_layers)
    )
    for stat in ("lag_mean_z", "lag_logvar"):
        assert f"bn_warmup/{stat}_before" in m and f"bn_warmup/{stat}_after" in m
    # dead units: the largest dead_frac over the epoch after the switch minus the one before
    dead = dict(history(root, rid, "drift/features.4/dead_frac"))
    jump = max(v for s, v in dead.items() if 8 <= s < 16) - dead[7]
    assert m["bn_warmup/features.4/dead_frac_jump"] == pytest.approx(jump)
    assert m["bn_warmup/dead_frac_jump"] >= m["bn_warmup/features.4/dead_frac_jump"]
    # everything at the switch step, and the same numbers in the JSON report
    assert [s for s, _ in history(root, rid, "bn_warmup/max_spike")] == [8]
    path = client(root).download_artifacts(rid, "drift/bn_warmup.json", str(root))
    report = json.loads(Path(path).read_text())
    assert report["bn_warmup/max_spike"] == pytest.approx(m["bn_warmup/max_spike"])
    # the whitened layers have lags from step 8 on, the BNs until step 7
    assert min(s for s, _ in history(root, rid, "drift/features.0/lag_mean_z")) == 8
    assert max(s for s, _ in history(root, rid, "drift/features.1/lag_mean_z")) == 7
    # the sweep figure: loss and post-switch staleness per k, from the children's artifacts
    parent = next(r for r in all_runs(root) if r.data.tags.get("rescalelab.sweep") == "parent")
    out = root / "sweep"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_drift.py"), "--parent", parent.info.run_id,
         "--tracking-uri", f"sqlite:///{root}/mlflow.db", "--out", str(out), "--log"],
        capture_output=True, text=True, env=cli_env(), cwd=root, timeout=300,
    )  # fmt: skip
    assert_ok(proc)
    data = (out / "warmup_sweep.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    logged = {a.path for a in client(root).list_artifacts(parent.info.run_id, "drift/figures")}
    assert logged == {"drift/figures/warmup_sweep.png"}


def test_summary_from_given_losses_and_drift_records():
    mon = BNWarmupMonitor(window=3)
    mon.switch_step = 5
    mon.drift = DriftMonitor()
    records = {
        3: {"drift/a/dead_frac": 0.1, "drift/bn/lag_mean_z_probe": 0.4},
        4: {"drift/a/dead_frac": 0.2, "drift/bn/lag_mean_z_probe": 0.5,
            "drift/bn2/lag_mean_z_probe": 0.7},
        5: {"drift/a/dead_frac": 0.6, "drift/a/lag_mean_z_probe": 0.05},
        7: {"drift/a/dead_frac": 0.3},
        9: {"drift/a/dead_frac": 0.9},  # beyond the epoch after the switch (4 steps)
    }  # fmt: skip
    for step, metrics in records.items():
        mon.drift.record.add(step, metrics)
    steps = np.arange(10)
    losses = np.array([3.0, 2.8, 2.6, 2.4, 2.2, 2.9, 3.1, 2.5, 2.3, 2.1])
    out = mon.summarise(steps, losses, steps_per_epoch=4)
    assert not any(k.endswith("switch_step") for k in out)  # norm/switch_step, by the switch
    assert out["bn_warmup/loss_before"] == 2.2 and out["bn_warmup/loss_after"] == 2.9
    assert out["bn_warmup/loss_before_mean"] == pytest.approx((2.6 + 2.4 + 2.2) / 3)
    assert out["bn_warmup/max_spike_step"] == 6
    assert out["bn_warmup/max_spike"] == pytest.approx(3.1 - 2.4)
    assert out["bn_warmup/lag_mean_z_probe_before"] == 0.7  # worst layer at step 4
    assert out["bn_warmup/bn/lag_mean_z_probe_before"] == 0.5
    assert out["bn_warmup/lag_mean_z_probe_after"] == 0.05
    assert out["bn_warmup/a/dead_frac_jump"] == pytest.approx(0.6 - 0.2)


def test_without_a_warmup_the_monitor_logs_nothing_and_bad_settings_fail():
    with pytest.raises(ConfigError, match=r"callbacks.bn_warmup.window=0 is invalid"):
        BNWarmupMonitor(window=0)
    pl.seed_everything(0, verbose=False)
    data = SyntheticImages(num_train=128, num_val=32, batch_size=32)
    plug = BatchNorm()
    optim = functools.partial(torch.optim.SGD, lr=0.05)
    sched = constant
    module = Classifier(SmallCNN(data.input_shape, 10, norm=plug), 10, optim, sched, plug)
    monitor = BNWarmupMonitor()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, callbacks=[DriftMonitor(figures=False), monitor],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert not monitor.active and monitor.report == {} and monitor.switch_step is None
