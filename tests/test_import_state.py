"""Importing rescalelab changes no global state; the entry points register what the configs need.

A fresh interpreter first imports every third-party module that rescalelab's modules pull in
(their own import-time effects are not ours), takes a snapshot of the process-wide registries,
imports every module of ``rescalelab`` and ``hydra_plugins.rescalelab_plugins``, and compares.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import cli_env

_WALK = """
import importlib, pkgutil, sys
import rescalelab, hydra_plugins.rescalelab_plugins as plugins
OURS = ("rescalelab", "hydra_plugins.rescalelab_plugins")
def ours():
    names = [m.name for m in pkgutil.walk_packages(rescalelab.__path__, "rescalelab.")]
    names += [m.name for m in pkgutil.walk_packages(plugins.__path__, plugins.__name__ + ".")]
    return [n for n in names if not n.endswith("__main__")]
"""

_LIST_THIRD_PARTY = (
    _WALK
    + """
for name in ours():
    importlib.import_module(name)
print("\\n".join(n for n in sys.modules if not n.startswith(OURS)))
"""
)

_COMPARE = (
    _WALK
    + """
import copyreg, json, logging, warnings
from multiprocessing.reduction import ForkingPickler
import torch
from omegaconf import OmegaConf
for name in sys.stdin.read().split():
    try:
        importlib.import_module(name)
    except Exception:
        pass

def state():
    loggers = logging.Logger.manager.loggerDict
    return {
        "resolvers": sorted(
            n for n in ("rescalelab.on_rank_zero", "rescalelab.gpus_per_node")
            if OmegaConf.has_resolver(n)
        ),
        "warnings.filters": [repr(f) for f in warnings.filters],
        "ForkingPickler._extra_reducers": sorted(map(repr, ForkingPickler._extra_reducers)),
        "copyreg.dispatch_table": sorted(map(repr, copyreg.dispatch_table)),
        "sys.path": list(sys.path),
        "logging": [logging.root.level, repr(logging.root.handlers)] + sorted(
            (n, lg.level, len(lg.handlers)) for n, lg in loggers.items()
            if isinstance(lg, logging.Logger) and not n.startswith(OURS)
        ),
        "logging.captureWarnings": repr(warnings.showwarning),
        "torch": [torch.get_num_threads(), str(torch.get_default_dtype()),
                  torch.are_deterministic_algorithms_enabled(),
                  torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark],
    }

before = state()
for name in ours():
    importlib.import_module(name)
after = state()
print(json.dumps({k: [before[k], after[k]] for k in before if before[k] != after[k]}))
"""
)


def _python(code: str, stdin: str = "") -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], input=stdin, capture_output=True, text=True,
        timeout=600, env=cli_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_importing_every_rescalelab_module_changes_no_global_state():
    third_party = _python(_LIST_THIRD_PARTY)
    changed = json.loads(_python(_COMPARE, stdin=third_party).strip().splitlines()[-1])
    assert changed == {}, f"importing rescalelab changed {json.dumps(changed, indent=1)}"


TORCHRUN_RANK_1 = {
    "TORCHELASTIC_RUN_ID": "test", "RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0",
    "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555",
}  # fmt: skip


def _show_output_subdir(tmp_path, *overrides: str, env: dict | None = None) -> str:
    """``python -m rescalelab.train <overrides> --cfg hydra --resolve``: its hydra.output_subdir."""
    flags = ["--cfg", "all", "--resolve"]
    proc = subprocess.run(
        [sys.executable, "-m", "rescalelab.train", *overrides, f"paths.root={tmp_path}", *flags],
        capture_output=True, text=True, timeout=300, env=env or cli_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ConfigStore schema" not in proc.stdout + proc.stderr  # the notice stays silenced
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("  output_subdir:")]
    return line.split(":", 1)[1].strip()


def test_the_cli_registers_the_resolvers_its_configs_use(tmp_path):
    """``trainer=ddp_cpu``'s ``hydra.output_subdir: ${rescalelab.on_rank_zero:.hydra}`` resolves
    in the CLI: ``.hydra`` on rank 0, ``null`` on a torchrun rank 1; and the CLI composes
    ``hydra/launcher=submitit_slurm`` without Hydra's schema-matching notice."""
    assert _show_output_subdir(tmp_path, "hydra/launcher=submitit_slurm", "trainer=ddp_cpu") == (
        ".hydra"
    )
    rank1 = cli_env(**TORCHRUN_RANK_1)
    assert _show_output_subdir(tmp_path, "trainer=ddp_cpu", env=rank1) == "null"
