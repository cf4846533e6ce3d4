"""Bad input: one clear line naming the key, a non-zero exit, and no run in the store.

The table runs through the CLI's entry point (``rescalelab.train.main``, what
``rescalelab-train`` calls) with each case's argv, in *one* subprocess for the whole table: a
fresh interpreter per row would cost ~5 s of imports each. Every case gets its own
``paths.root`` (a copy of the migrated store), checked afterwards to hold no run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from rescalelab.validate import uncovered_keys, validate
from tests.fixtures_data import (
    truncate_file,
    wnid,
    write_cifar10,
    write_cifar_bad_module,
    write_cifar_string_labels,
    write_garbage,
    write_imagefolder,
)
from tests.helpers import TINY, all_runs, cli_env, run_cli

CONF = Path(__file__).resolve().parents[1] / "src" / "rescalelab" / "conf"

# (overrides, text the error must contain). {data}: a folder of dataset fixtures (see below).
CASES: list[tuple[list[str], str]] = [
    (["optim.lr=-1"], "error: optim.lr=-1 is invalid: expected a number > 0"),
    (["+model.num_classes=5"], "model.num_classes=5 is invalid: the data (SyntheticImages) has 10 classes"),
    (["optim.lr=0"], "optim.lr=0 is invalid: expected a number > 0"),
    (["optim.lr=fast"], "optim.lr='fast' is invalid: expected a number > 0"),
    (["data.batch_size=0"], "data.batch_size=0 is invalid: expected an integer > 0"),
    (["data.batch_size=-8"], "data.batch_size=-8 is invalid"),
    (["data.batch_size=1.5"], "data.batch_size=1.5 is invalid"),
    (["data.num_train=0"], "data.num_train=0 is invalid"),
    (["seed=-1"], "seed=-1 is invalid: expected an integer in [0, 4294967295]"),
    (["seed=4294967296"], "seed=4294967296 is invalid: expected an integer in [0, 4294967295]"),
    # non-finite floats (1e400 is YAML's inf), rejected like nan
    (["optim.lr=nan"], "optim.lr=nan is invalid: expected a number > 0"),
    (["optim.lr=inf"], "optim.lr=inf is invalid: expected a number > 0"),
    (["optim.lr=1e400"], "optim.lr=inf is invalid: expected a number > 0"),
    (["optim.momentum=-inf"], "optim.momentum=-inf is invalid: expected a number in [0, 1)"),
    # the launch: several CPU devices need trainer=ddp_cpu; float16 AMP needs a GPU
    (["trainer.devices=4"], "trainer.devices=4 is invalid with trainer=cpu (one process): for several CPU processes use trainer=ddp_cpu"),
    (["+trainer.precision=16-mixed"], "trainer.precision=16-mixed is invalid on a CPU: float16 AMP needs a GPU"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 is invalid: expected an integer >= 1"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc' is invalid: expected an integer >= 1"),
    (["trainer.deterministic=maybe"], "trainer.deterministic='maybe' is invalid: expected true"),
    (["trainer=gpu", "trainer.precision=8-bit"], "trainer.precision='8-bit' is invalid: expected one of: 32-true"),
    (["optim.momentum=1.5"], "optim.momentum=1.5 is invalid: expected a number in [0, 1)"),
    (["param_groups.layer_scale=wide"], "param_groups.layer_scale='wide' is invalid: expected one of: none, fanin"),
    # a constructor's own checks (rescalelab.errors.checked), also on every job of a sweep
    (["schedule=halving", "schedule.every=0"], "error: schedule.every=0 is invalid: expected an integer >= 1"),
    (["-m", "schedule=halving", "schedule.every=10,0"], "error: job 1 (schedule.every=0): schedule.every=0 is invalid"),
    (["optim.nesterov=true"], "error: optim.nesterov=true is invalid with optim.momentum=0.0: expected momentum > 0"),
    (["data.batch_size=100000"], "data.batch_size=100000 is invalid: expected <= data.num_train=512"),
    (["data.field_noise=loud"], "data.field_noise='loud' is invalid: expected a number >= 0"),
    # unknown option, unknown keys (overridden, or added with +): Hydra's words, on one line
    (["norm=foo"], "error: Could not find 'norm/foo'; Available options in 'norm': batch_renorm, bn, bn_warmup, groupnorm, layernorm, none, weightnorm, whitening"),
    (["data.colour=red"], "error: Could not override 'data.colour'; To append to your config use +data.colour=red"),
    (["optim.lrr=0.1"], "error: Could not override 'optim.lrr'; To append to your config use +optim.lrr=0.1; did you mean optim.lr?"),
    (["trainer.precision=16-mixed"], "error: Could not override 'trainer.precision'; To append to your config use +trainer.precision=16-mixed"),
    (["optim.lr=[1"], "error: cannot parse the override 'optim.lr=[1': no viable alternative at input '[1'"),
    (
        ["+data.colour=red"],
        "error: data.colour is not a key of data (rescalelab.data.SyntheticImages): expected one "
        "of: batch_size, channels,",
    ),
    (
        ["+optim.nesterov_typo=true"],
        "error: optim.nesterov_typo is not a key of optim (torch.optim.SGD): expected one of:",
    ),
    (["+max_epochs=3"], "error: max_epochs is not a config key: expected a config group or one of:"),
    # the reliability keys
    (["callbacks.guard.max_factor=0.5"], "callbacks.guard.max_factor=0.5 is invalid: expected a number > 1"),
    (["callbacks.last.every_n_train_steps=0"], "callbacks.last.every_n_train_steps=0 is invalid"),
    (["logger.tracking_uri=mlflow.db"], "logger.tracking_uri='mlflow.db' is invalid: expected a URI"),
    (["resume=yes"], "resume='yes' is invalid: expected true or false"),
    (["resume=true"], "resume=true is invalid here: "),
    (["ckpt_path={data}/none.ckpt"], "ckpt_path={data}/none.ckpt is invalid: expected an existing"),
    # combinations
    (
        ["norm=bn_warmup", "norm.warmup_epochs=3", "trainer.max_epochs=3"],
        "norm.warmup_epochs=3 is invalid: expected < trainer.max_epochs=3",
    ),
    (
        ["trainer=ddp_cpu", "data.batch_size=63"],
        "data.batch_size=63 is invalid: the global batch must divide across 2 ranks",
    ),
    # datasets: fraction out of range, missing folder, truncated pickle, corrupt JPEG
    (["data=imagenet_subset", "data.fraction=1.5"], "data.fraction=1.5 is invalid: expected a fraction in (0, 1]"),
    (["data=cifar10", "data.root={data}/absent"], "data.root={data}/absent has no CIFAR-10 dataset"),
    (["data=cifar10", "data.root={data}/cifar_truncated"], "is truncated or not a CIFAR-10 pickle"),
    (
        ["data=cifar10", "data.root={data}/cifar_bad_module"],
        "error: data.root: cannot read {data}/cifar_bad_module/cifar-10-batches-py/data_batch_3 "
        "(UnpicklingError: it names nonexistent_module.thing, which CIFAR-10 never holds)",
    ),
    (
        ["data=cifar10", "data.root={data}/cifar_string_labels"],
        "error: data.root: {data}/cifar_string_labels/cifar-10-batches-py/test_batch has b'labels' "
        "that are not a list of integers",
    ),
    # Hydra's own flags: one mode at a time (Hydra itself answers with a ValueError traceback)
    (["-m", "experiment=memorization", "--cfg", "hydra"], "error: -m --cfg: Hydra takes one of -m, --cfg, --info at a time"),
    # sweeps: every job is checked before the first starts; no parent run either
    (["-m", "optim.lr=0.1,-1,0.2"], "error: job 1 (optim.lr=-1): optim.lr=-1 is invalid: expected a number > 0"),
    (["-m", "optim.lr=-1,0.1"], "error: job 0 (optim.lr=-1): optim.lr=-1 is invalid: expected a number > 0"),
    (["-m", "norm=bn,foo"], "error: job 1 (norm=foo): Could not find 'norm/foo'; Available options in 'norm':"),
    (["-m", "optim.lr=0.1,0.2", "seed=0,4294967296"], "error: job 1 (optim.lr=0.1 seed=4294967296): seed=4294967296 is invalid"),
    (["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=0"], "error: hydra.launcher.n_jobs=0 is invalid: expected an integer >= 1"),
    (
        ["data=imagenet_subset", "data.root={data}/imagenet_corrupt", "data.num_classes=null",
         "data.fraction=1.0", "data.image_size=32", "data.progress=false", "data.num_workers=0"],
        "error: data.root: cannot read image {data}/imagenet_corrupt/train/",
    ),
]  # fmt: skip

# One subprocess runs every case through the CLI entry point and reports (argv, exit, stderr).
DRIVER = """
import contextlib, io, json, sys
from hydra.core.global_hydra import GlobalHydra
from rescalelab.train import main
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["rescalelab-train", *argv]
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # reported, never hidden
            code = f"raised {type(e).__name__}: {e}"
    GlobalHydra.instance().clear()
    results.append({"code": code, "stderr": err.getvalue()})
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Broken datasets: a truncated CIFAR-10 pickle and an ImageNet folder with a corrupt JPEG."""
    root = tmp_path_factory.mktemp("bad_data")
    write_cifar10(root / "cifar_truncated", per_batch=20, test=20)
    truncate_file(root / "cifar_truncated" / "cifar-10-batches-py" / "data_batch_2")
    write_imagefolder(root / "imagenet_corrupt", num_classes=2, train_counts=[3, 3], val_count=2)
    write_garbage(root / "imagenet_corrupt" / "train" / wnid(1) / f"{wnid(1)}_0.JPEG")
    write_cifar10(root / "cifar_bad_module", per_batch=20, test=20)
    write_cifar_bad_module(root / "cifar_bad_module" / "cifar-10-batches-py" / "data_batch_3")
    write_cifar10(root / "cifar_string_labels", per_batch=20, test=20)
    write_cifar_string_labels(root / "cifar_string_labels" / "cifar-10-batches-py" / "test_batch")
    return root


def test_bad_input_table_fails_cleanly(tmp_path, migrated_db, data_dir):
    assert len(CASES) >= 15
    roots, argvs = [], []
    for i, (overrides, _) in enumerate(CASES):
        root = tmp_path / f"case{i}"
        root.mkdir()
        shutil.copy(migrated_db, root / "mlflow.db")
        roots.append(root)
        args = [o.format(data=data_dir) for o in overrides]
        base = TINY if not any(a.startswith("data=") for a in args) else TINY[3:]
        flags = [a for a in args if a == "-m"]  # Hydra's flags come first
        argvs.append([*flags, *base, *[a for a in args if a != "-m"], f"paths.root={root}"])
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(argvs)],
        capture_output=True, text=True, timeout=900, env=cli_env(), cwd=tmp_path,
    )  # fmt: skip
    assert "RESULTS" in proc.stdout, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    failures = []
    for (overrides, message), root, result in zip(CASES, roots, results):
        message = message.format(data=data_dir)
        lines = result["stderr"].strip().splitlines()
        problems = [
            "" if result["code"] == 2 else f"exit {result['code']}, expected 2",
            "" if lines and message in lines[-1] else f"no {message!r} as the last line",
            "" if sum(line.startswith("error:") for line in lines) == 1 else "not one error line",
            "Traceback" if "Traceback" in result["stderr"] else "",
            "a run in the store" if all_runs(root) else "",
        ]
        if any(problems):
            failures.append(f"{overrides}: {[p for p in problems if p]}\n{result['stderr'][-800:]}")
    assert not failures, "\n".join(failures)


def test_unknown_option_lists_the_valid_choices(root):
    proc = run_cli(root, "model=resnet9000")
    assert proc.returncode != 0
    assert "Available options" in proc.stderr
    assert "small_cnn" in proc.stderr and "lenet" in proc.stderr
    assert all_runs(root) == []


def test_a_bad_value_exits_2_with_one_line(root):
    """The console script itself: exit status 2, the message as the last line, nothing tracked."""
    proc = subprocess.run(
        [shutil.which("rescalelab-train", path=str(Path(sys.executable).parent)) or "",
         "optim.lr=-1", f"paths.root={root}"],
        capture_output=True, text=True, env=cli_env(), cwd=root, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: optim.lr=-1 is invalid: expected a number > 0"
    )
    assert all_runs(root) == []


# -- the schema: every key of every option has a rule --------------------------------------------
BASE = ["paths.root=/tmp/rescalelab-compose", "paths.output_dir=/tmp/rescalelab-compose/out"]
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def _options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), _options(), ids=[f"{g}={o}" for g, o in _options()])
def test_every_key_of_every_option_has_a_rule(group, option):
    with initialize_config_module("rescalelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*BASE, f"{group}={option}"])
    missing = uncovered_keys(cfg)
    assert not missing, f"check these in their constructor (errors.checked) or RULES: {missing}"


def test_rules_check_type_range_and_wildcards():
    with initialize_config_module("rescalelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*BASE, "callbacks.checkpoint.dirpath=''"])
    with pytest.raises(
        ValueError, match=r"callbacks.checkpoint.dirpath='' is invalid: expected a folder"
    ):
        validate(cfg)
    with initialize_config_module("rescalelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*BASE, "trainer.devices=auto", "optim.lr=1e-3"])
    validate(cfg)  # "auto" is a valid device count, 1e-3 a valid stepsize
