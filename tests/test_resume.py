"""Resume: a CLI run killed (SIGKILL) at any point, before its first checkpoint, mid-epoch, at an
epoch's end, during validation, in its last epoch, or stopped (SIGTERM), continues in the same
MLflow run and ends with exactly the metrics of an uninterrupted run with the same seed; and
``last.ckpt`` is committed at exactly the steps asked for. (The kill at each kind of point:
tests/test_resume_kills.py.)"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rescalelab.data import TensorBatches
from rescalelab.resume import check_unchanged, merge_overrides, plan_resume, write_run_files
from tests.helpers import all_runs, assert_ok, cli_env, client, history, run_cli
from tests.probes import committed_steps, probe_env

STEPS_PER_EPOCH = 16  # 1024 / 64
RUN = [
    "data.num_train=1024", "data.num_val=128", "data.batch_size=64", "trainer.max_epochs=3",
    "trainer.log_every_n_steps=2", "trainer.enable_progress_bar=false",
    "callbacks.last.every_n_train_steps=5",  # 5, 10, 15, 20, ...: never at an epoch's end
    "schedule=cosine",  # a schedule whose position matters: α_k changes every step
]  # fmt: skip
EVERY = 5
EPOCH_ENDS = [16, 32, 48]  # callbacks.checkpoint (save_last) rewrites last.ckpt after each epoch
COMMIT_LOG = ["+callbacks.commits._target_=tests.probes.CommitLog",
              "+callbacks.commits.dirpath=${paths.output_dir}"]  # fmt: skip


def uninterrupted(tmp_path_factory: pytest.TempPathFactory, migrated_db: Path) -> dict:
    """The uninterrupted run: every metric's history, and the steps of its ``last.ckpt``s."""
    root = tmp_path_factory.mktemp("reference")
    shutil.copy(migrated_db, root / "mlflow.db")
    run_dir = root / "run"
    proc = run_cli(root, *RUN, *COMMIT_LOG, f"hydra.run.dir={run_dir}", tiny=False, env=probe_env())
    assert_ok(proc)
    (run,) = all_runs(root)
    histories = {
        k: history(root, run.info.run_id, k)
        for k in run.data.metrics
        if not k.startswith("system/")  # wall-clock samples of the machine, not of training
    }
    return {"histories": histories, "commits": committed_steps(run_dir)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, migrated_db: Path) -> dict:
    return uninterrupted(tmp_path_factory, migrated_db)


def start_then_signal(root: Path, run_dir: Path, sig: int) -> tuple[int, str]:
    """Start the CLI; send ``sig`` as soon as its first ``last.ckpt`` exists (mid-epoch 1)."""
    out = root / f"out_{sig}.txt"
    with out.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rescalelab.train", *RUN, f"paths.root={root}",
             f"hydra.run.dir={run_dir}"],
            stdout=f, stderr=subprocess.STDOUT, text=True, env=cli_env(), cwd=root,
        )  # fmt: skip
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 600
        while proc.poll() is None and not ckpt.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(sig)
        proc.wait(timeout=600)
    return proc.returncode, out.read_text()


def assert_same_histories(root: Path, run_id: str, reference: dict) -> None:
    for key, ref in reference["histories"].items():
        got = history(root, run_id, key)
        steps = [s for s, _ in got]
        assert steps == sorted(set(steps)), f"{key}: steps repeat or go back: {steps}"
        assert steps == [s for s, _ in ref], f"{key}: steps differ (a gap?)"
        assert [v for _, v in got] == pytest.approx([v for _, v in ref], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_continues_the_same_run(root, reference):
    run_dir = root / "run"
    code, out = start_then_signal(root, run_dir, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the run ended before it was killed:\n{out[-2000:]}"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] % STEPS_PER_EPOCH != 0, "the checkpoint is not mid-epoch"
    (killed,) = all_runs(root)
    assert killed.info.status == "RUNNING"  # SIGKILL: nobody could end it

    # The directory says what to resume: no other override is needed.
    proc = run_cli(root, "resume=true", f"hydra.run.dir={run_dir}", tiny=False)
    assert_ok(proc)
    (run,) = all_runs(root)  # one MLflow run, not two
    assert run.info.run_id == killed.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["rescalelab.resumes"] == "1"
    assert run.data.tags["rescalelab.status"] == "finished"
    assert_same_histories(root, run.info.run_id, reference)

    # Resuming a finished run trains nothing and logs nothing.
    proc = run_cli(root, "resume=true", f"hydra.run.dir={run_dir}", tiny=False)
    assert_ok(proc)
    assert "already finished" in proc.stderr
    assert_same_histories(root, run.info.run_id, reference)
    # ... but with a changed value it is the changed-config error, not "already finished".
    proc = run_cli(root, "resume=true", f"hydra.run.dir={run_dir}", "optim.lr=0.2", tiny=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: optim.lr=0.2 is invalid with resume=true: the run being resumed has optim.lr="
        )
    )
    assert "already finished" not in proc.stderr
    (again,) = all_runs(root)
    assert again.info.status == "FINISHED" and again.data.tags["rescalelab.resumes"] == "1"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_ends_killed_and_resumes(root, reference):
    run_dir = root / "run"
    code, out = start_then_signal(root, run_dir, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out[-2000:]
    assert f"continue it with: rescalelab-train resume=true hydra.run.dir={run_dir}" in out
    (stopped,) = all_runs(root)
    assert stopped.info.status == "KILLED"
    assert stopped.data.tags["rescalelab.status"] == "killed"
    assert not (run_dir / "checkpoints" / "last.ckpt.staged").exists()

    # A resumed run keeps the experiment it started with.
    proc = run_cli(root, "resume=true", f"hydra.run.dir={run_dir}", "optim.lr=0.2", tiny=False)
    assert proc.returncode == 2
    assert "error: optim.lr=0.2 is invalid with resume=true: the run being resumed has " in (
        proc.stderr
    )
    assert all_runs(root)[0].info.status == "KILLED"

    # An empty last.ckpt and no other checkpoint (best.ckpt comes at the epoch's end): one line,
    # exit 2, and the run is left resumable.
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    last.write_bytes(b"")
    proc = run_cli(root, "resume=true", f"hydra.run.dir={run_dir}", tiny=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: resume=true is invalid here: {last} cannot be resumed from (the file is empty) "
        f"and {last.parent} holds no other readable checkpoint; expected a readable last.ckpt "
        f"(or move it away to restart run {stopped.info.run_id} from step 0, or pass "
        "ckpt_path=<a checkpoint>)"
    )
    assert all_runs(root)[0].info.status == "KILLED"
    last.write_bytes(saved)

    # Where things go may change (here: also log the final checkpoints to MLflow).
    proc = run_cli(
        root, *RUN, "resume=true", f"hydra.run.dir={run_dir}", "logger.log_model=true", tiny=False
    )
    assert_ok(proc)
    (run,) = all_runs(root)
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    assert_same_histories(root, run.info.run_id, reference)
    logged = {a.path for a in client(root).list_artifacts(run.info.run_id, "checkpoints")}
    assert logged == {"checkpoints/best.ckpt", "checkpoints/last.ckpt"}


def test_last_ckpt_is_committed_at_exactly_the_steps_asked_for(reference):
    """Every EVERY steps (mid-epoch, LastCheckpoint) and after every epoch (ModelCheckpoint)."""
    mid_epoch = list(range(EVERY, 48, EVERY))
    assert reference["commits"] == sorted(mid_epoch + EPOCH_ENDS)


# -- the pieces, in-process ----------------------------------------------------------------------
def _batches(n: int = 40, batch: int = 8) -> TensorBatches:
    x = torch.arange(n, dtype=torch.float32).view(n, 1).repeat(1, 3)

    def jitter(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return xb + torch.rand(xb.shape, generator=g)

    return TensorBatches(x, torch.arange(n), batch, shuffle=True, seed=3, transform=jitter)


def test_data_position_is_what_was_trained_on_not_what_was_prefetched():
    ref = _batches()
    passes = [[xb for xb, _ in ref] for _ in range(2)]  # 5 batches per epoch, 2 epochs

    data = _batches()
    it = iter(data)
    first = next(it)  # Lightning fetches one batch ahead of the step that trains on it
    data.mark_consumed()
    nxt = next(it)
    data.mark_consumed()
    next(it)  # prefetched, not trained on
    state = data.state_dict()
    assert state == {"epoch": 0, "position": 2}
    assert torch.equal(first[0], passes[0][0]) and torch.equal(nxt[0], passes[0][1])

    resumed = _batches()
    resumed.load_state_dict(state)
    rest = [xb for xb, _ in resumed]
    assert all(
        torch.equal(a, b) for a, b in zip(rest, passes[0][2:], strict=True)
    )  # same jitter too
    assert all(torch.equal(a, b) for a, b in zip([xb for xb, _ in resumed], passes[1], strict=True))


def test_a_fully_consumed_epoch_resumes_at_the_next_one():
    data = _batches()
    for _ in data:
        data.mark_consumed()
    assert data.state_dict() == {"epoch": 1, "position": 0}


def test_resume_overrides_keep_the_run_s_own_and_let_the_command_win():
    original = ["optim.lr=0.1", "norm=bn", "paths.root=/a"]
    merged = merge_overrides(original, ["resume=true", "paths.root=/b", "+trainer.foo=1"])
    assert merged == ["optim.lr=0.1", "norm=bn", "resume=true", "paths.root=/b", "+trainer.foo=1"]


def test_a_resumed_run_keeps_its_experiment_but_may_change_where_things_go():
    recorded = {"optim.lr": "0.1", "paths.root": "/a", "trainer.enable_progress_bar": "True"}
    check_unchanged(recorded, {"optim.lr": "0.1", "paths.root": "/b", "resume": "True"})
    with pytest.raises(
        ValueError, match=r"optim.lr=0.2 is invalid with resume=true: .* has optim.lr=0.1"
    ):
        check_unchanged(recorded, {"optim.lr": "0.2"})
    with pytest.raises(
        ValueError, match=r"optim.nesterov=True is invalid .* has optim.nesterov=None"
    ):
        check_unchanged(recorded, {"optim.lr": "0.1", "optim.nesterov": "True"})


def test_plan_resume_reads_the_directory(tmp_path):
    cfg = OmegaConf.create({"resume": True, "ckpt_path": None})
    with pytest.raises(ValueError, match="holds no run to resume"):
        plan_resume(cfg, tmp_path, ["resume=true"], multirun=False)
    assert plan_resume(cfg, tmp_path, ["resume=true"], multirun=True) is None  # a job to start
    write_run_files(tmp_path, "abc123", ["optim.lr=0.1", "norm=bn"])
    plan = plan_resume(cfg, tmp_path, ["resume=true", "norm=none"], multirun=False)
    assert plan is not None and plan.run_id == "abc123" and plan.ckpt_path is None
    assert plan.overrides == ["optim.lr=0.1", "resume=true", "norm=none"] and plan.recomposed
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"state_dict": {}, "global_step": 7, "loops": {}}, ckpts / "last.ckpt")
    plan = plan_resume(cfg, tmp_path, ["resume=true"], multirun=False)
    assert plan is not None and plan.ckpt_path == str(ckpts / "last.ckpt")


def test_an_unreadable_last_ckpt_falls_back_to_a_readable_one_or_is_one_line(tmp_path, capsys):
    cfg = OmegaConf.create({"resume": True, "ckpt_path": None})
    write_run_files(tmp_path, "abc123", ["optim.lr=0.1"])
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"last.ckpt cannot be resumed from \(the file is empty\)"):
        plan_resume(cfg, tmp_path, ["resume=true"], multirun=False)
    torch.save({"state_dict": {}, "global_step": 9, "loops": {}}, ckpts / "last.ckpt.staged")
    (ckpts / "other.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="holds no other readable checkpoint"):
        plan_resume(cfg, tmp_path, ["resume=true"], multirun=False)  # never the staged one
    torch.save({"state_dict": {}, "global_step": 8, "loops": {}}, ckpts / "best.ckpt")
    whole = (ckpts / "best.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(whole[: len(whole) // 2])  # truncated
    plan = plan_resume(cfg, tmp_path, ["resume=true"], multirun=False)
    assert plan is not None and plan.ckpt_path == str(ckpts / "best.ckpt")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: {ckpts / 'last.ckpt'} cannot be resumed from (torch.load")
    assert line.endswith(f"resuming from {ckpts / 'best.ckpt'} (global step 8) instead")
    # ckpt_path= must read too.
    bad = OmegaConf.create({"resume": False, "ckpt_path": str(ckpts / "other.ckpt")})
    with pytest.raises(ValueError, match=r"ckpt_path=.*other.ckpt is invalid: torch.load cannot"):
        plan_resume(bad, tmp_path, [], multirun=False)
