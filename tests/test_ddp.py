"""Distributed training that is correct, not only launched: ``trainer=ddp_cpu`` (2 gloo ranks).

End to end through the CLI: one MLflow run per job (never one per rank), metrics once per step,
one output directory per job, checkpoints written once, replicas that agree (parameters, and the
running statistics that must agree), and the same numbers as one process on the same global
batch. Unit tests cover the launch checks, the rank logic and the SLURM launcher parameters.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from rescalelab.errors import ConfigError
from rescalelab.validate import validate
from tests.helpers import (
    TINY,
    all_runs,
    assert_ok,
    child_runs,
    cli_env,
    compose_train,
    history,
    run_cli,
)

EPOCHS = ["trainer.max_epochs=3"]  # 8 steps per epoch; norm=bn_warmup switches at epoch 2
STEPS = list(range(1, 24, 2))  # train/* logged every 2 steps: 1, 3, ..., 23
VAL_STEPS = [7, 15, 23]
DUMP = "+callbacks.replicas={_target_:rescalelab.distributed.DumpReplicaState,dirpath:${paths.output_dir}/replicas}"
# The drift instruments reduce their statistics across ranks before logging them.
DRIFT = ["callbacks=drift", "callbacks.drift.figures=false", "callbacks.drift.arrays=false",
         "callbacks.drift.probe_size=64"]  # fmt: skip


def _final_state(job_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(job_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return ckpt["state_dict"]


def _replicas(job_dir: Path) -> tuple[dict, dict]:
    files = sorted((job_dir / "replicas").glob("rank*.pt"))
    assert [f.name for f in files] == ["rank0.pt", "rank1.pt"]
    r0, r1 = (torch.load(f, weights_only=False) for f in files)
    assert (r0["global_rank"], r1["global_rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["pid"] != r1["pid"]  # really two processes
    return r0, r1


def _max_diff(a: dict, b: dict, keys) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


def _params(state: dict) -> list[str]:
    return [
        k
        for k in state
        if not k.rsplit(".", 1)[-1].startswith(("running_", "num_batches", "rescale_"))
    ]


def _losses(root: Path, run) -> dict[str, list[tuple[int, float]]]:
    return {k: history(root, run.info.run_id, k) for k in ("train/loss", "val/loss")}


def _assert_once_per_step(root: Path, run) -> None:
    h = _losses(root, run)
    assert [s for s, _ in h["train/loss"]] == STEPS  # once per logging step, no duplicates
    assert [s for s, _ in h["val/loss"]] == VAL_STEPS


def _jobs(root: Path) -> dict[str, tuple[object, Path]]:
    """``{norm option or norm.sync value: (child run, job output dir)}`` of the multiruns in root."""
    out = {}
    for run in child_runs(root):
        name = run.info.run_name.split(" #")[0].lower()  # norm.sync=True or =true
        out[name] = (run, Path(run.data.tags["rescalelab.output_dir"]))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, migrated_db) -> tuple[Path, dict]:
    """One process, the same global batch: norm=bn (one run; the whitening and bn_warmup
    references are tests/test_ddp_whitening.py's, so that the two files can run on two
    pytest-xdist workers)."""
    root = tmp_path_factory.mktemp("single")
    shutil.copy(migrated_db, root / "mlflow.db")
    assert_ok(run_cli(root, "trainer=cpu", "norm=bn", *DRIFT, *EPOCHS))
    (run,) = all_runs(root)
    return root, {"norm=bn": (run, Path(run.data.tags["rescalelab.output_dir"]))}


def _diffs(root, run, ref_root, ref_run, key: str) -> list[float]:
    """|DDP − one process| of ``key`` at every logged step (the same steps in both)."""
    got, want = history(root, run.info.run_id, key), history(ref_root, ref_run.info.run_id, key)
    assert [s for s, _ in got] == [s for s, _ in want]
    return [abs(a - b) for (_, a), (_, b) in zip(got, want)]


# Same math, other summation order (all-reduces): equal to float rounding. BatchNorm training
# amplifies those ~1e-7 differences about tenfold every few steps (to ~2e-3 after 3 epochs here),
# so BN runs are compared step by step over their first epoch and by their final val/loss.
ROUNDING, BN_FINAL = 1e-5, 5e-3


@pytest.mark.slow
def test_ddp_multirun_bn_sync_matches_one_process_and_local_bn_does_not(root, reference):
    """The 2-job multirun: norm.sync=false,true. SyncBatchNorm (gloo) = one process exactly."""
    proc = run_cli(root, "-m", "trainer=ddp_cpu", "norm=bn", "norm.sync=false,true", DUMP, *EPOCHS)
    assert_ok(proc)
    runs = all_runs(root)
    parents = [r for r in runs if r.data.tags.get("rescalelab.sweep") == "parent"]
    children = child_runs(root)
    assert len(parents) == 1 and len(children) == 2  # one run per job, none per rank
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(_jobs(root)) == ["norm.sync=false", "norm.sync=true"]
    # One output directory per job, nothing scattered by re-executed ranks.
    dirs = {Path(r.data.tags["rescalelab.output_dir"]) for r in children}
    assert len(dirs) == 2 and all(d.parent.parent.parent == root / "multirun" for d in dirs)
    sweep_dir = next(iter(dirs)).parent
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1"]
    assert not (root / "outputs").exists()
    assert (
        proc.stdout.count("finished (rescalelab)") + proc.stderr.count("finished (rescalelab)") == 2
    )

    ref_root, ref = reference
    ref_run = ref["norm=bn"][0]
    jobs = _jobs(root)
    for run, job_dir in jobs.values():
        _assert_once_per_step(root, run)
        assert sorted(p.name for p in (job_dir / "checkpoints").iterdir()) == [
            "best.ckpt", "last.ckpt",
        ]  # fmt: skip
        r0, r1 = _replicas(job_dir)
        assert r0["global_step"] == r1["global_step"] == 24
        assert _max_diff(r0["state"], r1["state"], _params(r0["state"])) == 0.0  # DDP replicas
        # The checkpoint is rank 0's state, written once at the end.
        assert _max_diff(_final_state(job_dir), r0["state"], r0["state"]) == 0.0
    run, job_dir = jobs["norm.sync=true"]
    r0, r1 = _replicas(job_dir)
    assert _max_diff(r0["state"], r1["state"], r0["state"]) == 0.0  # running stats too
    assert max(_diffs(root, run, ref_root, ref_run, "train/loss")[:4]) <= ROUNDING
    assert _diffs(root, run, ref_root, ref_run, "val/loss")[-1] <= BN_FINAL
    # Local BatchNorm (sync=false) normalizes each rank's half with the half's statistics: a
    # different function from the first step on (and DDP's buffer broadcast leaves rank 0's
    # running statistics on every rank).
    run, job_dir = jobs["norm.sync=false"]
    assert _diffs(root, run, ref_root, ref_run, "train/loss")[0] > 1e-3
    assert _diffs(root, run, ref_root, ref_run, "val/loss")[-1] < 0.05


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")  # fmt: skip
def test_torchrun_ranks_make_one_run_in_one_fixed_directory(root, reference):
    """Externally started ranks: every rank runs the Hydra app, only rank 0 tracks and writes."""
    out = root / "outputs" / "tr"
    args = [*TINY, *EPOCHS, "trainer=ddp_cpu", "norm=bn", "norm.sync=true", DUMP,
            f"paths.root={root}", f"hydra.run.dir={out}"]  # fmt: skip
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node=2", "-m", "rescalelab.train", *args],
        capture_output=True, text=True, timeout=600, env=cli_env(), cwd=root,
    )  # fmt: skip
    assert_ok(proc)
    (run,) = all_runs(root)
    assert run.info.status == "FINISHED"
    assert (proc.stdout + proc.stderr).count("finished (rescalelab)") == 1
    _assert_once_per_step(root, run)
    assert [p.name for p in (root / "outputs").iterdir()] == ["tr"]
    assert sorted(p.name for p in (out / ".hydra").iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml",
    ]  # fmt: skip
    r0, r1 = _replicas(out)
    assert _max_diff(r0["state"], r1["state"], r0["state"]) == 0.0
    ref_root, ref = reference
    ref_run = ref["norm=bn"][0]
    assert max(_diffs(root, run, ref_root, ref_run, "train/loss")[:4]) <= ROUNDING
    assert _diffs(root, run, ref_root, ref_run, "val/loss")[-1] <= BN_FINAL


# -- bad input: before any run exists ------------------------------------------------------------


def test_global_batch_must_divide_across_ranks(root):
    proc = run_cli(root, "trainer=ddp_cpu", "data.batch_size=63")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "error: data.batch_size=63 is invalid: the global batch must divide across 2 ranks "
        "(trainer.devices=2 x trainer.num_nodes=1)" in proc.stderr
    )
    assert all_runs(root) == []
    with pytest.raises(ConfigError, match="divide across 6 ranks"):
        validate(compose_train("trainer=ddp", "trainer.devices=3", "trainer.num_nodes=2"))
    validate(compose_train("trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_trainers_fail_clearly_without_cuda(root):
    proc = run_cli(
        root, "trainer=gpu", "trainer.precision=bf16-mixed", "trainer.channels_last=true"
    )
    assert proc.returncode == 2
    assert "error: trainer=gpu needs a CUDA device; use trainer=cpu" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert all_runs(root) == []
    from rescalelab.distributed import check_launch

    with pytest.raises(ConfigError, match=r"trainer=ddp needs a CUDA device; use trainer=ddp_cpu"):
        check_launch(compose_train("trainer=ddp"))


def test_several_nodes_need_external_ranks():
    from rescalelab.distributed import check_launch

    with pytest.raises(ConfigError, match="trainer.num_nodes=2 is invalid here"):
        check_launch(compose_train("trainer=ddp_cpu", "trainer.num_nodes=2"))
    check_launch(compose_train("trainer=ddp_cpu"))


# -- rank logic ------------------------------------------------------------------------------


TORCHRUN_RANK_1 = {
    "TORCHELASTIC_RUN_ID": "test", "RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0",
    "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555",
}  # fmt: skip


def test_a_torchrun_rank_other_than_zero_never_touches_the_store(monkeypatch, tmp_path):
    from rescalelab.distributed import ddp_strategy, launch_rank, launched_externally
    from rescalelab.resolvers import on_rank_zero
    from rescalelab.tracking import MlflowRunFactory
    from rescalelab.tracking.run import ReplicaRun

    assert not launched_externally() and launch_rank() == 0
    assert ddp_strategy()._start_method == "spawn"  # Lightning starts the ranks: never popen
    with pytest.raises(ConfigError, match="start_method=popen is invalid"):
        ddp_strategy(start_method="popen")
    for k, v in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(k, v)
    assert launched_externally() and launch_rank() == 1
    assert on_rank_zero(".hydra") is None  # hydra.output_subdir: rank 1 writes no .hydra/
    db = tmp_path / "mlflow.db"
    run = MlflowRunFactory(f"sqlite:///{db}", "rescalelab").start(
        compose_train("trainer=ddp_cpu"), overrides=[], output_dir=str(tmp_path)
    )
    assert isinstance(run, ReplicaRun) and run.run_id is None
    assert run.logger().run_id == ""  # a logger like rank 0's, bound to nothing
    run.end("FINISHED")
    assert not db.exists()  # not even opened
    strategy = ddp_strategy()
    assert strategy._start_method == "popen"  # the launcher sees external ranks: no re-exec
    monkeypatch.setenv("RANK", "0")
    assert launch_rank() == 0 and on_rank_zero(".hydra") == ".hydra"


# -- synchronized BatchNorm ---------------------------------------------------------------------


def test_sync_norm_layers_swap_classes_and_keep_tensors():
    from rescalelab.distributed import GlobalBatchNorm, SyncNormLayers

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(16))
    model[1].running_mean.add_(0.5)
    tensors = [model[1].weight, model[1].running_mean, model[3].bias, model[3].running_var]
    x = torch.randn(8, 3, 4, 4)
    want = model(x)
    for accelerator, cls in [("cpu", GlobalBatchNorm), ("gpu", nn.SyncBatchNorm)]:
        plugin = SyncNormLayers(accelerator)
        synced = plugin.apply(model)
        assert [type(synced[i]) for i in (1, 3)] == [cls, cls]
        same = [synced[1].weight, synced[1].running_mean, synced[3].bias, synced[3].running_var]
        assert all(a is b for a, b in zip(tensors, same))
        model = plugin.revert(synced)
        assert [type(model[i]) for i in (1, 3)] == [nn.BatchNorm2d, nn.BatchNorm1d]
        assert all(a is b for a, b in zip(tensors, [model[1].weight, model[1].running_mean,
                                                    model[3].bias, model[3].running_var]))  # fmt: skip
    # One process: GlobalBatchNorm is BatchNorm (train and eval).
    synced = SyncNormLayers("cpu").apply(model)
    torch.testing.assert_close(synced(x), want, rtol=0, atol=0)
    synced.eval(), model.eval()
    torch.testing.assert_close(synced(x), model(x), rtol=0, atol=0)


def test_ddp_cpu_trainer_uses_spawned_ranks_and_sync_norm():
    from hydra.utils import instantiate
    from pytorch_lightning.strategies import DDPStrategy

    from rescalelab.distributed import SyncNormLayers

    cfg = compose_train("trainer=ddp_cpu", "norm=bn", "norm.sync=true")
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._start_method == "spawn" and trainer.world_size == 2
    assert trainer.strategy.process_group_backend == "gloo"
    assert isinstance(trainer.strategy._layer_sync, SyncNormLayers)
    trainer = instantiate(compose_train("trainer=ddp_cpu", "norm=bn").trainer, logger=False)
    assert trainer.strategy._layer_sync is None


# -- SLURM ---------------------------------------------------------------------------------------


def _sbatch_text(monkeypatch, tmp_path, *overrides: str) -> str:
    """The sbatch file submitit would submit for this config (srun must be on PATH to build it)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with warnings.catch_warnings():  # Hydra's same-name schema notice (see distributed.py)
        warnings.simplefilter("ignore", UserWarning)
        cfg = compose_train("hydra/launcher=submitit_slurm", *overrides, hydra=True)
    launcher = instantiate(cfg.hydra.launcher)
    # What SlurmLauncher.launch does with its params before submitting.
    params = dict(launcher.params)
    folder = params.pop("submitit_folder")
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m rescalelab.train", "0")


def test_submitit_slurm_launcher_asks_for_one_task_per_rank(monkeypatch, tmp_path):
    text = _sbatch_text(
        monkeypatch, tmp_path, "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4",
        "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=240",
    )  # fmt: skip
    for line in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=4",
                 "--time=240", "--partition=gpu"]:  # fmt: skip
        assert f"#SBATCH {line}\n" in text, text
    assert "srun " in text
    cpu = _sbatch_text(monkeypatch, tmp_path, "trainer=ddp_cpu")
    assert "#SBATCH --ntasks-per-node=2\n" in cpu and "gpus-per-node" not in cpu


def test_channels_last_converts_conv_weights_before_ddp_wraps():
    from hydra.utils import instantiate

    from rescalelab.distributed import ChannelsLast
    from rescalelab.module import Classifier

    cfg = compose_train("trainer=ddp_cpu", "+trainer.channels_last=true")
    trainer = instantiate(cfg.trainer, logger=False)
    (cb,) = [c for c in trainer.callbacks if isinstance(c, ChannelsLast)]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    module = Classifier(model, 2, instantiate(cfg.optim), instantiate(cfg.schedule))
    assert not model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6)
    want = module(x)
    cb.setup(trainer, module, "fit")
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(module(x), want)  # same function, other layout
