"""A run recorded before the one-house redesign renamed its keys (``optim.layer_scale`` is now
``param_groups.layer_scale``) cannot be resumed: ``resume=true`` answers one line naming the new
key, exits 2, and leaves the recorded run as it was."""

from __future__ import annotations

from pathlib import Path

import yaml

from rescalelab.resume import OVERRIDES_FILE, RENAMED, renamed_hint
from tests.helpers import all_runs, assert_ok, run_cli


def test_renamed_hint_names_each_renamed_key_once():
    hint = renamed_hint(["optim.lr=0.1", "optim.layer_scale=fanin", "+optim.layer_scale=none"])
    assert hint.count("optim.layer_scale is now param_groups.layer_scale") == 1
    assert renamed_hint(["optim.lr=0.1", "param_groups.layer_scale=fanin"]) == ""
    assert set(RENAMED.values()) <= {
        "param_groups.layer_scale", "param_groups.decay_exclude",
        "lr_scheduler_config.interval", "lr_scheduler_config.frequency",
    }  # fmt: skip


def test_resuming_a_run_recorded_with_a_renamed_key_is_one_line_and_exit_2(tmp_path: Path):
    run_dir = tmp_path / "run"
    assert_ok(run_cli(tmp_path, f"hydra.run.dir={run_dir}"))
    (before,) = all_runs(tmp_path)
    # what the run's files held before the rename
    (run_dir / OVERRIDES_FILE).write_text(yaml.safe_dump(["optim.layer_scale=fanin"]))
    proc = run_cli(tmp_path, "resume=true", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: resume=true: the run's overrides no longer compose: ")
    assert "optim.layer_scale is now param_groups.layer_scale" in line
    (after,) = all_runs(tmp_path)
    assert (after.info.run_id, after.info.status) == (before.info.run_id, "FINISHED")
    assert after.data.metrics == before.data.metrics
