"""The options a job chose for its config groups, as params: ``norm=whitening``, ``method=bn``.

MLflow's filters and group-by then work on option names (``params.norm = 'whitening'``) rather
than on class paths (``norm._target_``). Read from Hydra's runtime choices, which hold the final
choice after every preset (``method=sg`` chooses ``norm: none``).
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig

OPTION_GROUPS = ("norm", "method", "model", "data", "optim", "schedule")


def option_params() -> dict[str, str]:
    """``{group: option}`` for the groups of :data:`OPTION_GROUPS` that have a choice."""
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {g: str(choices[g]) for g in OPTION_GROUPS if choices.get(g) is not None}
