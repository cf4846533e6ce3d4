"""The researcher's daily path: a quiet console, train.log, a runnable UI hint, and what a run
records with MLflow's own features (system metrics, dataset input, environment, choices)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY, all_runs, assert_ok, cli_env, client, run_cli

NOISE = ("litlogger", "GPU available", "TPU available", "deprecated", "Creating initial MLflow")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("daily")
    proc = run_cli(root)
    assert_ok(proc)
    (run,) = all_runs(root)
    return root, proc, run


def test_console_is_quiet_and_train_log_holds_the_projects_lines(default_run):
    root, proc, run = default_run
    out = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in out, f"{noise!r} on the console:\n{out[-3000:]}"
    (log,) = (root / "outputs").glob("*/*/train.log")
    text = log.read_text()
    assert f"run {run.info.run_id} finished" in text
    assert f"run {run.info.run_id} finished" in proc.stderr  # the console shows it too


def test_ui_hint_is_runnable_as_printed_and_names_the_runs_url(default_run):
    root, proc, run = default_run
    exp = run.info.experiment_id
    url = f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run.info.run_id}"
    assert url in proc.stderr
    (command,) = re.findall(r"browse it: (\S+) ui --backend-store-uri (\S+)", proc.stderr)
    exe, uri = command
    assert uri == f"sqlite:///{root}/mlflow.db"
    # The printed program runs as printed: the venv's mlflow, by path when not on PATH.
    check = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "mlflow" in check.stdout.lower()


def test_run_records_system_metrics_dataset_environment_and_choices(default_run):
    root, _, run = default_run
    c = client(root)
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), run.data.metrics
    assert any(k.startswith("system/system_memory") for k in run.data.metrics)
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "SyntheticImages" and re.fullmatch(r"[0-9a-f]{16}", ds.dataset.digest)
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
    tags = run.data.tags
    import mlflow
    import torch

    assert tags["env.torch"] == torch.__version__ and tags["env.mlflow"] == mlflow.__version__
    assert {"env.cuda", "env.cudnn", "env.lightning", "env.hydra"} <= set(tags)
    assert tags["choice.norm"] == "none" and tags["choice.data"] == "synthetic"
    files = {f.path for f in c.list_artifacts(run.info.run_id, "environment")}
    assert "environment/pip_freeze.txt" in files
    freeze = Path(c.download_artifacts(run.info.run_id, "environment/pip_freeze.txt", str(root)))
    assert f"torch=={importlib.metadata.version('torch')}\n" in freeze.read_text()
    if tags.get("rescalelab.git_dirty") == "true":
        assert "environment/git_diff.patch" in files
    # MLflow 3's UI opens this experiment on its model-training views, not the GenAI ones.
    assert c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )


def test_the_dataset_digest_follows_the_data_and_not_the_batch_size(tmp_path):
    from omegaconf import OmegaConf

    from rescalelab.data import SyntheticImages
    from rescalelab.tracking.environment import dataset_entity

    def digest(**kw):
        cfg = {"_target_": "rescalelab.data.SyntheticImages", "num_train": 256, "num_val": 64,
               "batch_size": 32, "seed": 0, **kw}  # fmt: skip
        dm = SyntheticImages(**{k: v for k, v in cfg.items() if k != "_target_"})
        dm.setup("fit")
        return dataset_entity(dm, OmegaConf.create(cfg)).digest

    assert digest() == digest(batch_size=64)
    assert digest() != digest(seed=1)
    assert digest() != digest(num_train=512)


def test_a_theory_job_leaves_no_stray_checkpoint(tmp_path):
    """callbacks.checkpoint=null (the theory presets): no Lightning default ModelCheckpoint."""
    proc = run_cli(
        tmp_path, "experiment=theory_fixed_step", "data.num_train=200", "data.num_val=50",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", tiny=False,
    )  # fmt: skip
    assert_ok(proc)
    (job,) = (tmp_path / "outputs").glob("*/*")
    stray = [p for p in job.rglob("*.ckpt") if p.parent != job / "checkpoints"]
    assert not stray and not (job / "None").exists(), stray
    assert not [p for p in job.rglob("*") if p.name == "best.ckpt"]


def test_help_describes_groups_presets_and_sister_commands(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rescalelab.train", "--help"], capture_output=True, text=True,
        timeout=300, env=cli_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert text.startswith("rescalelab-train:")
    groups: dict[str, str] = {}  # the first "group: options" line of each ($CONFIG comes later)
    for line in text.splitlines():
        if line.startswith(("experiment:", "norm:")):
            groups.setdefault(line.split(":", 1)[0], line.split(":", 1)[1])
    assert {"bn_warmup", "norm_compare", "memorization"} <= set(
        groups["experiment"].replace(",", " ").split()
    )
    assert {"bn", "bn_warmup", "none", "whitening"} <= set(groups["norm"].replace(",", " ").split())
    for command in ("rescalelab-report", "rescalelab-bench", "rescalelab-prepare-imagenet",
                    "rescalelab-compare", "docs/"):  # fmt: skip
        assert command in text
    assert "powered by Hydra" not in text


def test_parent_runs_are_named_by_what_differs(tmp_path):
    from datetime import datetime

    from rescalelab.tracking.sweep import parent_name

    when = datetime(2026, 12, 1, 12, 0, 0)
    name = parent_name(None, ["norm=none,bn", "trainer.max_epochs=2"], ["norm"], when)
    assert name == "sweep norm=none,bn 2026-12-01 12:00:00"
    assert parent_name("theory_fixed_step", [], ["optim.lr", "seed"], when).startswith(
        "theory_fixed_step optim.lr seed "
    )
    assert TINY  # the fixtures above use the tiny settings
