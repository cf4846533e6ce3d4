"""The OmegaConf resolvers the configs use, registered by the entry points, never on import.

``${rescalelab.on_rank_zero:x}`` (``trainer=ddp*``'s ``hydra.output_subdir``) and
``${rescalelab.gpus_per_node:accelerator,devices}`` (``hydra/launcher=submitit_slurm``) must
exist in every process that resolves them. The CLI registers them (:func:`rescalelab.train.main`)
before Hydra composes; the processes of joblib and submitit jobs receive them from there, since
Hydra's singleton state, which those launchers pickle to each job, holds OmegaConf's resolvers
(by reference: the functions here). Any notebook, script or test that composes
``rescalelab.conf`` calls :func:`register_resolvers` first (``tests/conftest.py`` does for the
tests). Importing a rescalelab module changes no global state (``tests/test_import_state.py``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from omegaconf import OmegaConf


def on_rank_zero(value: Any) -> Any:
    """Resolver ``${rescalelab.on_rank_zero:x}``: ``x`` on launch rank 0, else ``None``.

    The rank is the one an external launcher (torchrun, srun) set, known before
    ``torch.distributed`` starts (:func:`rescalelab.distributed.launch_rank`).
    """
    from rescalelab.distributed import launch_rank

    return value if launch_rank() == 0 else None


def gpus_per_node(accelerator: str, devices: Any) -> int | None:
    """Resolver ``${rescalelab.gpus_per_node:accelerator,devices}``: GPUs a SLURM task asks for."""
    return devices if accelerator in ("gpu", "cuda") else None


RESOLVERS = {
    "rescalelab.on_rank_zero": on_rank_zero,
    "rescalelab.gpus_per_node": gpus_per_node,
}


def register_resolvers() -> None:
    """Register the ``rescalelab.*`` resolvers with OmegaConf; calling it again does nothing.

    Call it before Hydra composes ``rescalelab.conf``. A Hydra ``Callback`` would be too late:
    it is built from the composed config, after the preflight composition and ``--cfg all
    --resolve`` have resolved it, and ``run_job`` resolves ``hydra.output_subdir`` before
    ``on_job_start``.
    """
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# conf/hydra/launcher/submitit_slurm.yaml keeps the name users type (hydra/launcher=
# submitit_slurm) although it matches the plugin's ConfigStore schema; Hydra 1.3 then merges the
# schema (harmless: the file is complete) and warns on every composition.
_SCHEMA_MATCH = r"\n?'hydra/launcher/submitit_slurm' is validated against ConfigStore schema"


@contextlib.contextmanager
def composing() -> Iterator[None]:
    """While Hydra composes and runs the app: the resolvers exist, the schema notice is silent.

    The warnings filter lives only inside this block (``warnings.catch_warnings``).
    """
    register_resolvers()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SCHEMA_MATCH)
        yield
