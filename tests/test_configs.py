"""Every option of every config group composes and instantiates (new options are covered automatically)."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import rescalelab
from rescalelab.validate import validate
from tests.helpers import compose_train

CONF = Path(rescalelab.__file__).parent / "conf"
GROUPS = ["data", "model", "norm", "optim", "schedule", "trainer", "callbacks", "logger", "paths"]
SKIP_INSTANTIATE = {("trainer", "gpu"), ("trainer", "ddp")}  # need hardware this machine lacks


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


# Options that only make sense together with others: composed with their partners.
PARTNERS = {("callbacks", "theory"): ["data=quadratic", "model=linear"]}


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes_and_instantiates(group, option):
    cfg = compose_train(f"{group}={option}", *PARTNERS.get((group, option), []))
    validate(cfg)
    node = cfg[group]
    if (group, option) in SKIP_INSTANTIATE or group in ("logger", "paths"):
        return
    if group == "callbacks":
        for c in node.values():
            if c is not None and "_target_" in c:
                assert instantiate(c) is not None
        return
    if group == "data":
        dm = instantiate(node)
        assert dm.num_classes >= 1 and len(dm.input_shape) >= 1  # 1: regression problems
        return
    data = instantiate(compose_train().data)
    if group == "model":
        norm = instantiate(compose_train().norm)
        model = instantiate(
            node, input_shape=data.input_shape, num_classes=data.num_classes, norm=norm
        )
        out = model(torch.zeros(2, *data.input_shape))
        assert out.shape == (2, data.num_classes)
    elif group == "norm":
        assert instantiate(node).name
    elif group == "optim":  # a plain torch partial, built as written
        opt = instantiate(node)([torch.nn.Parameter(torch.zeros(1))])
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt.param_groups[0]["lr"] == node.lr
    elif group == "schedule":  # a plain partial f(optimizer) -> LRScheduler
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        assert isinstance(instantiate(node)(opt), torch.optim.lr_scheduler.LRScheduler)
    elif group == "trainer":
        import pytorch_lightning as pl

        assert isinstance(instantiate(node, logger=False), pl.Trainer)


@pytest.mark.parametrize("method", [p.stem for p in sorted((CONF / "method").glob("*.yaml"))])
def test_param_groups_node_builds_the_groups_as_written(method):
    """``param_groups`` is a plain partial f(model, geometry) -> groups; a method sets its keys."""
    from rescalelab.geometry import layer_geometry
    from rescalelab.models import SmallCNN

    cfg = compose_train(f"method={method}")
    validate(cfg)
    assert "layer_scale" not in cfg.optim and "decay_exclude" not in cfg.optim
    model = SmallCNN((3, 32, 32), 10)
    groups = instantiate(cfg.param_groups)(model, layer_geometry(model, (3, 32, 32)))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    fanin = cfg.param_groups.layer_scale == "fanin"
    assert any(g["lr_scale"] != 1.0 for g in groups) == fanin
    assert any(g.get("weight_decay") == 0.0 for g in groups) == cfg.param_groups.decay_exclude


def test_every_trainer_option_is_built_by_the_one_factory():
    """A reader of conf/trainer/<option>.yaml knows what comes out: build_trainer's pl.Trainer."""
    targets = {o: compose_train(f"trainer={o}").trainer._target_ for o in options("trainer")}
    assert set(targets.values()) == {"rescalelab.distributed.build_trainer"}, targets


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(preset):
    validate(compose_train(f"experiment={preset}"))


def test_interface_keys_exist_with_their_defaults():
    cfg = compose_train()
    assert cfg.seed == 0
    assert cfg.logger.tracking_uri == "sqlite:////tmp/rescalelab-compose/mlflow.db"
    for key in ("logger.experiment_name", "trainer.max_epochs", "data.batch_size",
                "data.num_train", "data.num_val", "optim.lr"):  # fmt: skip
        assert key.split(".")[1] in cfg[key.split(".")[0]], key


def test_tracking_uri_env_var_is_the_default(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert compose_train().logger.tracking_uri == "http://127.0.0.1:5999"


def test_wheel_ships_every_config(tmp_path):
    """Build the wheel and run the CLI's config composition from the unpacked wheel alone."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(repo)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("rescalelab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"rescalelab/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml")}
    assert expected and expected <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = subprocess.run(
        [sys.executable, "-c", "import rescalelab, sys; print(rescalelab.__file__)"],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        check=True, cwd=tmp_path,
    )  # fmt: skip
    assert out.stdout.strip().startswith(str(site))
    job = subprocess.run(
        [sys.executable, "-m", "rescalelab.train", "--cfg", "job", f"paths.root={tmp_path}"],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        cwd=tmp_path,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-2000:]
    assert "_target_: rescalelab.models.SmallCNN" in job.stdout
