"""Sweeps as experiments: parent runs, presets, the report at the end, failures (joblib, Optuna
and the budget search: tests/test_sweepers.py).

Real CLI subprocesses into real SQLite stores, read back with MlflowClient.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import rescalelab
from rescalelab.gpu_slots import GpuPerWorker, claim_gpu
from rescalelab.tracking.sweep import parent_status, swept_keys
from rescalelab.validate import validate
from tests.helpers import (
    assert_ok,
    child_runs,
    client,
    compose_train,
    history,
    run_cli,
    tracking_uri,
)
from tests.helpers import report_rows as _report_rows
from tests.helpers import sweep_parent as _parent

CONF = Path(rescalelab.__file__).parent / "conf"


# ----------------------------------------------------------------------------- in-process


def test_swept_keys_combine_sweeper_params_and_the_command_line():
    params = {"method": "sg,bn", "optim.lr": "0.1,1", "seed": "0,1,2", "trainer.max_epochs": 3}
    assert swept_keys(["norm.momentum=0.1,0.2", "data=synthetic"], params) == [
        "method", "optim.lr", "seed", "norm.momentum",
    ]  # fmt: skip
    # The command line replaces a preset's sweep key by key: seed=0 stops sweeping the seed.
    assert swept_keys(["seed=0", "optim.lr=0.5,1"], params) == ["method", "optim.lr"]
    assert swept_keys([], {"optim.lr": "tag(log, interval(0.001, 1.0))"}) == ["optim.lr"]
    assert parent_status(True, 0, None) == "FINISHED"
    assert parent_status(True, 1, None) == "FAILED"
    assert parent_status(False, 0, RuntimeError()) == "FAILED"
    assert parent_status(False, 0, KeyboardInterrupt()) == "KILLED"


SEEDS = {"seed": "range(0,3)"}  # every comparison preset: n_seeds=3 seeds
PRESET_SWEEPS = {
    "paper_cifar10": {
        "method": "sg,sg_fanin,bn,whitening",
        "optim.lr": "0.01,0.03,0.1,0.3,1,3",
        **SEEDS,
    },
    "paper_imagenet_10pct": {"method": "bn,whitening", "optim.lr": "0.01,0.1,1", **SEEDS},
    "bn_warmup": {"norm.warmup_epochs": "0,1,2,3", "norm.lr_after_switch": "0.1,0.3,1.0", **SEEDS},
    "norm_compare": {
        "method": "sg,bn,layernorm,groupnorm,weightnorm,batch_renorm,sgd_tuned,adamw,soap,muon",
        "optim.lr": "0.001,0.003,0.01,0.03,0.1",
        **SEEDS,
    },
    "memorization": {
        "method": "sg,sg_fanin,bn,whitening",
        "optim.lr": "0.03,0.1,0.3,1",
        **SEEDS,
    },
    "memorization_knobs": {"optim.lr": "0.3,1,3", "norm.max_scale": "null,10,100", **SEEDS},
    "tuning": {
        "method": "sg,sg_fanin,bn,whitening,rmsprop,adam,adagrad",
        "optim.lr": "0.0001,0.0003,0.001,0.003,0.01,0.03,0.1,0.3,1,3,10",
        **SEEDS,
    },
}
PRESET_DATA = {"paper_cifar10": "CIFAR10", "paper_imagenet_10pct": "ImageNetSubset",
               "bn_warmup": "CIFAR10", "tuning": "CIFAR10", "norm_compare": "SyntheticImages",
               "memorization": "SyntheticImages", "memorization_knobs": "SyntheticImages"}  # fmt: skip
# The presets that rank by the training cost in eval mode (the lecture's "training cost").
TRAIN_EVAL_RANKED = {"paper_cifar10", "paper_imagenet_10pct", "memorization", "memorization_knobs"}


@pytest.mark.parametrize("preset", sorted(PRESET_SWEEPS))
def test_lecture_presets_sweep_their_grid_and_run_on_small_data(preset):
    cfg = compose_train(f"experiment={preset}", hydra=True)
    assert OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True) == PRESET_SWEEPS[preset]
    # one documented key changes the number of seeds
    n5 = compose_train(f"experiment={preset}", "n_seeds=5", hydra=True)
    assert n5.hydra.sweeper.params.seed == "range(0,5)"
    assert cfg.data._target_.endswith(PRESET_DATA[preset])
    assert cfg.logger.experiment_name == preset
    ranked_by = "train_eval/loss" if preset in TRAIN_EVAL_RANKED else "train/loss"
    assert cfg.hydra.callbacks.mlflow_sweep.report_metric == ranked_by
    if preset in TRAIN_EVAL_RANKED:
        assert "train_eval" in cfg.callbacks and cfg.optimized_metric == "train_eval/loss"
    for data in ("synthetic", "digits"):  # the quick look: every preset on small data
        small = compose_train(f"experiment={preset}", f"data={data}", hydra=True)
        validate(small)
        assert small.data._target_ == compose_train(f"data={data}", hydra=True).data._target_


METHODS = {
    "sg": ("NoNorm", "SGD", "none"), "sg_fanin": ("NoNorm", "SGD", "fanin"),
    "bn": ("BatchNorm", "SGD", "none"), "whitening": ("Whitening", "SGD", "none"),
    "bn_warmup": ("BnWarmup", "SGD", "none"), "rmsprop": ("NoNorm", "RMSprop", "none"),
    "adam": ("NoNorm", "Adam", "none"), "adagrad": ("NoNorm", "Adagrad", "none"),
    "sgd_tuned": ("BatchNorm", "SGD", "none"), "adamw": ("BatchNorm", "AdamW", "none"),
    "layernorm": ("LayerNorm", "SGD", "none"), "groupnorm": ("GroupNorm", "SGD", "none"),
    "weightnorm": ("WeightNorm", "SGD", "none"), "batch_renorm": ("BatchRenormPlug", "SGD", "none"),
    "soap": ("NoNorm", "SOAP", "none"), "muon": ("NoNorm", "Muon", "none"),
}  # fmt: skip


def test_method_presets_set_norm_optimizer_and_layer_scale():
    assert sorted(p.stem for p in (CONF / "method").glob("*.yaml")) == sorted(METHODS)
    for method, (norm, optim, scale) in METHODS.items():
        cfg = compose_train(f"method={method}", hydra=True)
        validate(cfg)
        assert (cfg.norm._target_.rsplit(".", 1)[1], cfg.optim._target_.rsplit(".", 1)[1]) == (
            norm, optim,
        ), method  # fmt: skip
        assert cfg.param_groups.layer_scale == scale
    # The command line still wins over a method's choices.
    assert compose_train("method=bn", "norm=none", hydra=True).norm._target_.endswith("NoNorm")


def test_optuna_search_and_gpu_launcher_compose():
    cfg = compose_train("hparams_search=optuna_lr", hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.params["optim.lr"] == "tag(log, interval(0.001, 1.0))"
    assert cfg.hydra.sweeper.direction == "minimize" and cfg.optimized_metric == "val/loss"
    cfg = compose_train("hydra/launcher=joblib_gpus", hydra=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == -1
    assert cfg.hydra.callbacks.gpu_per_worker._target_ == "rescalelab.gpu_slots.GpuPerWorker"
    assert "mlflow_sweep" in cfg.hydra.callbacks


def test_gpu_slots_one_gpu_per_worker_process(tmp_path):
    slots = tmp_path / "slots"
    assert claim_gpu(["3", "5"], slots) == "3"
    assert claim_gpu(["3", "5"], slots) == "3"  # a worker keeps its GPU for its later jobs
    code = (
        "import sys; from pathlib import Path; from rescalelab.gpu_slots import claim_gpu\n"
        "try: print(claim_gpu(sys.argv[1].split(','), Path(sys.argv[2])))\n"
        "except RuntimeError as e: print('busy:', e)"
    )
    other = [sys.executable, "-c", code]
    out = subprocess.run([*other, "3,5", str(slots)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "5"  # this process holds 3
    out = subprocess.run([*other, "3", str(slots)], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("busy: every GPU of ['3'] is held by another worker")
    # n_jobs: -1 becomes one worker per GPU; more workers than GPUs is refused.
    cfg = compose_train("hydra/launcher=joblib_gpus", hydra=True)
    cb = GpuPerWorker(gpus=[0, 1])
    cb.on_multirun_start(cfg)
    assert cfg.hydra.launcher.n_jobs == 2
    with pytest.raises(ValueError, match=r"hydra.launcher.n_jobs=3 is invalid: expected 1..2"):
        GpuPerWorker(gpus="0,1").on_multirun_start(
            compose_train("hydra/launcher=joblib_gpus", "hydra.launcher.n_jobs=3", hydra=True)
        )


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_bn_warmup_preset_gives_one_parent_four_children_and_a_report(root):
    # warm-up epochs 0..3 need at least 4 epochs (the switch happens inside training)
    proc = run_cli(
        root,
        "-m",
        "experiment=bn_warmup",
        "data=synthetic",
        "trainer.max_epochs=4",
        "seed=0",
        "norm.lr_after_switch=0.1",
    )  # seed=0, one lr_after_switch: the command line wins over the preset's sweeps
    assert_ok(proc)
    parent = _parent(root, "bn_warmup")
    children = child_runs(root, "bn_warmup")
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith("bn_warmup norm.warmup_epochs 20")
    tags = parent.data.tags
    assert json.loads(tags["rescalelab.swept_keys"]) == ["norm.warmup_epochs"]
    assert tags["rescalelab.experiment"] == "bn_warmup" and tags["rescalelab.failed_jobs"] == "0"
    assert tags["rescalelab.sweep_end"] == "completed"
    assert Path(tags["rescalelab.sweep_dir"]).is_dir()
    assert sorted(r.info.run_name for r in children) == [
        f"norm.warmup_epochs={k} #{k}" for k in range(4)
    ]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.data.params["norm.warmup_epochs"] for r in children) == ["0", "1", "2", "3"]
    files = {a.path for a in client(root).list_artifacts(parent.info.run_id, "report")}
    assert {"report/children.csv", "report/report.html", "report/training_curves.png"} <= files
    assert "report/tuning_curves.png" in files  # one α: a point per configuration
    rows = {r["run_id"]: r for r in _report_rows(root, parent.info.run_id)}
    assert len(rows) == 4
    for run in children:
        row = rows[run.info.run_id]
        # final epoch value = the last epoch's train/loss_epoch (the mean over all 8 steps; the
        # step curve holds only every second one)
        epochs = dict(history(root, run.info.run_id, "epoch"))
        last = [v for s, v in history(root, run.info.run_id, "train/loss") if epochs[s] == 3]
        assert len(last) == 4  # 8 steps per epoch, logged every 2
        per_epoch = sorted(history(root, run.info.run_id, "train/loss_epoch"))
        assert len(per_epoch) == 4
        assert float(row["final_epoch_train/loss"]) == pytest.approx(per_epoch[-1][1])
        assert row["norm.warmup_epochs"] == run.data.params["norm.warmup_epochs"]
        assert float(row["final_val/loss"]) == pytest.approx(run.data.metrics["val/loss"])


@pytest.mark.slow
def test_a_job_that_raises_ends_the_parent_failed_with_its_report(root):
    # monitor=nope: ModelCheckpoint raises inside fit (the child ends FAILED, the job raises).
    proc = run_cli(root, "-m", "callbacks.checkpoint.monitor=val/loss,nope")
    assert proc.returncode != 0
    parent = _parent(root)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["rescalelab.failed_jobs"] == "1"
    assert parent.data.tags["rescalelab.sweep_end"] == "aborted"  # closed by the atexit hook
    statuses = sorted((r.info.run_name, r.info.status) for r in child_runs(root))
    assert statuses == [
        ("callbacks.checkpoint.monitor=nope #1", "FAILED"),
        ("callbacks.checkpoint.monitor=val/loss #0", "FINISHED"),
    ]
    rows = _report_rows(root, parent.info.run_id)
    assert sorted(r["status"] for r in rows) == ["FAILED", "FINISHED"]


@pytest.mark.slow
def test_quick_look_norm_sweep_prints_and_records_the_answer(root):
    # The quick look, shrunk: 3 norms, 2 epochs of 8 steps.
    proc = run_cli(
        root, "-m", "norm=none,bn,whitening", "trainer.max_epochs=2", "trainer.log_every_n_steps=1"
    )
    assert_ok(proc)
    parent = _parent(root)
    pid, eid = parent.info.run_id, parent.info.experiment_id
    children = child_runs(root)
    # each child records its chosen options, so MLflow filters by option name work
    assert sorted(r.data.params["norm"] for r in children) == ["bn", "none", "whitening"]
    assert {r.data.params["optim"] for r in children} == {"sgd"}
    (whitening,) = client(root).search_runs([eid], "params.norm = 'whitening'")
    assert whitening.data.params["norm._target_"].endswith("Whitening")
    # methods.csv: a row of numbers per norm; F* = the last epoch's mean training loss
    methods = {r["method"]: r for r in _report_rows(root, pid, "methods.csv")}
    assert sorted(methods) == ["norm=bn", "norm=none", "norm=whitening"]
    for run in children:
        row = methods[f"norm={run.data.params['norm']}"]
        epochs = dict(history(root, run.info.run_id, "epoch"))
        if "train/loss_epoch" in run.data.metrics:
            final = history(root, run.info.run_id, "train/loss_epoch")[-1][1]
        else:
            last = [v for s, v in history(root, run.info.run_id, "train/loss") if epochs[s] == 1]
            assert len(last) == 8  # every step of the second epoch
            final = sum(last) / len(last)
        assert float(row["best_final"]) == pytest.approx(final)
        assert row["seeds"] == "1" and row["runs"] == "1" and float(row["initial_loss"]) > 0
        first = history(root, run.info.run_id, "train/loss")[0]
        assert first[0] == 0  # the initial loss: step 0, before the first update
    l0 = sorted(history(root, r.info.run_id, "train/loss")[0][1] for r in children)[1]
    assert float(methods["norm=bn"]["initial_loss"]) == pytest.approx(l0)  # median of 3
    assert float(methods["norm=bn"]["target"]) == pytest.approx(0.01 * l0)
    files = {a.path for a in client(root).list_artifacts(pid, "report")}
    assert {"report/training_curves.png", "report/tuning_curves.png"} <= files
    # the parent: swept keys, the shared config as params, per-method results as metrics
    params, metrics = parent.data.params, parent.data.metrics
    assert params["swept_keys"] == "norm" and params["swept.norm"] == "none,bn,whitening"
    assert params["data.num_train"] == "512" and "norm._target_" not in params
    for norm in ("none", "bn", "whitening"):
        assert metrics[f"{norm}/best_final"] == pytest.approx(
            float(methods[f"norm={norm}"]["best_final"])
        )
    # the printed answer: parent id, a row per norm, the report, how to browse it
    out = proc.stdout
    assert f"sweep parent run {pid}: 3 runs" in out
    assert all(
        any(f"norm={n}" in ln for ln in out.splitlines()) for n in ("none", "bn", "whitening")
    )
    assert "report.html" in out and f"mlflow ui --backend-store-uri {tracking_uri(root)}" in out
    assert f"http://127.0.0.1:5000/#/experiments/{eid}/runs/{pid}" in out
