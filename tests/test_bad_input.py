"""Bad input: one clear line naming the key, a non-zero exit, and no run in the store."""

from __future__ import annotations

import pytest

from tests.helpers import all_runs, run_cli

CASES = [
    # (override, text the error must contain)
    ("optim.lr=-1", "optim.lr=-1 is invalid: expected a number > 0"),
    ("optim.lr=0", "optim.lr=0 is invalid: expected a number > 0"),
    ("optim.lr=fast", "optim.lr='fast' is invalid: expected a number > 0"),
    ("data.batch_size=0", "data.batch_size=0 is invalid: expected an integer > 0"),
    ("data.batch_size=-8", "data.batch_size=-8 is invalid"),
    ("data.batch_size=1.5", "data.batch_size=1.5 is invalid"),
    ("data.num_train=0", "data.num_train=0 is invalid"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 is invalid: expected an integer >= 1"),
    ("optim.momentum=1.5", "optim.momentum=1.5 is invalid: expected a number in [0, 1)"),
    ("optim.layer_scale=wide", "optim.layer_scale='wide' is invalid: expected one of: none, fanin"),
    ("data.batch_size=100000", "data.batch_size=100000 is invalid: expected <= data.num_train=512"),
    ("norm=groupnorm", "Could not find 'norm/groupnorm'"),
    ("data.colour=red", "Could not override 'data.colour'"),
    (
        "+optim.nesterov_typo=true",
        "optim (torch.optim.SGD) / schedule: SGD.__init__() got an unexpected keyword argument",
    ),
]


@pytest.mark.parametrize(("override", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(root, override, message):
    proc = run_cli(root, override)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert all_runs(root) == []


def test_unknown_option_lists_the_valid_choices(root):
    proc = run_cli(root, "model=resnet9000")
    assert proc.returncode != 0
    assert "Available options" in proc.stderr
    assert "small_cnn" in proc.stderr and "lenet" in proc.stderr
