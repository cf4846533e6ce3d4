"""Resume after SIGKILL at each kind of point: one run killed five times (before its first
checkpoint, mid-epoch, at an epoch's end, during validation, in its last epoch with a checkpoint
staged but not committed), resumed after each kill with ``resume=true`` alone, then from a
damaged ``last.ckpt``, ends with exactly the metrics of the uninterrupted run. (Its own file,
apart from tests/test_resume.py, so that pytest-xdist's ``--dist loadfile`` can run the two on two
workers.)"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import all_runs, assert_ok, history, run_cli
from tests.probes import probe_env
from tests.test_resume import RUN, assert_same_histories, uninterrupted


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, migrated_db: Path) -> dict:
    return uninterrupted(tmp_path_factory, migrated_db)


def _ckpt_step(run_dir: Path) -> int | None:
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def assert_consistent_so_far(root: Path, run_id: str, reference: dict) -> None:
    """What a killed run left in the store: no step twice, every value the reference's."""
    for key, ref in reference["histories"].items():
        got = history(root, run_id, key)
        steps = [s for s, _ in got]
        assert steps == sorted(set(steps)), f"{key}: steps repeat or go back: {steps}"
        expected = dict(ref)
        assert all(s in expected for s in steps), f"{key}: a step the reference lacks: {steps}"
        assert [v for _, v in got] == pytest.approx([expected[s] for s in steps], rel=1e-6), key


@pytest.mark.slow
def test_sigkill_at_each_kind_of_point_then_resume_gives_the_uninterrupted_run(root, reference):
    """One run killed five times, resumed after each kill with ``resume=true`` alone."""
    run_dir = root / "run"
    kill_at = [
        "+callbacks.kill._target_=tests.probes.KillAt",
        "+callbacks.kill.dirpath=${paths.output_dir}",
        "+callbacks.kill.steps=[3,12,40]",
        "+callbacks.kill.epoch_ends=[0]",
        "+callbacks.kill.validations=[1]",
    ]
    # (where the process dies, the global_step of the last.ckpt it leaves)
    points = [
        ("step 3, before the first checkpoint", None),
        ("step 12, mid-epoch", 10),
        ("the end of epoch 0, after its last.ckpt", 16),
        ("validation of epoch 1", 30),
        ("step 40 of the last epoch, staged but not committed", 35),
    ]
    first = [*RUN, *kill_at, f"hydra.run.dir={run_dir}"]
    again = ["resume=true", f"hydra.run.dir={run_dir}"]
    run_id = None
    for i, (where, step) in enumerate(points):
        proc = run_cli(root, *(again if i else first), tiny=False, env=probe_env())
        assert proc.returncode == -signal.SIGKILL, f"{where}: not killed\n{proc.stderr[-3000:]}"
        assert _ckpt_step(run_dir) == step, where
        (run,) = all_runs(root)  # one MLflow run, not one per attempt
        assert run_id in (None, run.info.run_id) and run.info.status == "RUNNING", where
        run_id = run.info.run_id
        assert_consistent_so_far(root, run_id, reference)
    assert (run_dir / "checkpoints" / "last.ckpt.staged").exists()  # the step-40 one

    # And last.ckpt is then damaged: the resume falls back to best.ckpt (an earlier epoch's end
    # of the same run), says so, and still gives the uninterrupted run.
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    proc = run_cli(root, *again, tiny=False, env=probe_env())
    assert_ok(proc)
    best = run_dir / "checkpoints" / "best.ckpt"
    assert f"warning: {last} cannot be resumed from (torch.load cannot read it" in proc.stderr
    assert f"resuming from {best} (global step " in proc.stderr
    (run,) = all_runs(root)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["rescalelab.resumes"] == str(len(points))
    assert_same_histories(root, run_id, reference)
