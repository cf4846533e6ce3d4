"""The Hydra callback that reports a theory sweep when its multirun ends.

Registered by the ``experiment=theory_*`` presets under ``hydra.callbacks.theory_report``; the
report itself (gap vs k with BCN's bounds, the summary of each ``kind``) is
:class:`rescalelab.analysis.theory_report.TheoryAnalysis`. A report failure never fails the
sweep: it is printed and tagged ``rescalelab.theory_report`` on the parent.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rescalelab.analysis.theory_report import TheoryAnalysis
from rescalelab.tracking.run import read_parent


class TheoryReport(Callback):
    """Hydra callback: the theory figure and summary on the sweep's parent run."""

    def __init__(
        self, kind: str = "fixed_step", plateau_from: float = 0.5, diverge_factor: float = 10.0
    ) -> None:
        self.analysis = TheoryAnalysis(kind, plateau_from, diverge_factor)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
        parent = read_parent(str(config.hydra.sweep.dir))
        if parent is None:
            return
        from mlflow import MlflowClient  # only needed once the sweep is over

        client = MlflowClient(parent["tracking_uri"])
        try:
            self.analysis.report(client, parent)
        except Exception as e:  # the sweep's own outcome matters more than its figure
            client.set_tag(parent["run_id"], "rescalelab.theory_report", f"failed: {e}")
            print(f"warning: the theory report failed: {type(e).__name__}: {e}", file=sys.stderr)


__all__ = ["TheoryReport"]
