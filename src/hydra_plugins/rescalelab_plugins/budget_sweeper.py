"""The equal-tuning-budget sweeper (``hydra/sweeper=budget``; see :mod:`rescalelab.analysis.budget`).

Here because Hydra instantiates sweepers only from the ``hydra_plugins`` package.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from rescalelab.analysis import budget


class BudgetSweeper(Sweeper):
    """The grid of ``params`` (and the command line) × ``trials`` QMC points of ``space``."""

    def __init__(
        self,
        trials: int,
        space: Mapping[str, Mapping[str, Any]],
        seed: int = 0,
        params: Mapping[str, str] | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.trials, self.seed, self.max_batch_size = int(trials), int(seed), max_batch_size
        self.params = dict(params or {})
        self.space = OmegaConf.to_container(space) if OmegaConf.is_config(space) else dict(space)
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def job_overrides(self, arguments: Sequence[str]) -> list[list[str]]:
        """Every job's overrides: grid combination, then the trial's point and number."""
        assert self.hydra_context is not None and self.config is not None
        points = budget.qmc_points(self.space, self.trials, self.seed)  # type: ignore[arg-type]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        grid_args = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        overrides = [o for o in parser.parse_overrides(grid_args) if o.key_or_group not in
                     self.space]  # fmt: skip
        axes = {}  # key -> its values, the command line replacing params key by key
        for o in overrides:
            key = o.get_key_element()
            if o.is_sweep_override():
                axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
            else:
                axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        combos = list(itertools.product(*axes.values()))
        jobs = []
        present_of: dict[tuple[str, ...], list[str]] = {}
        for combo in combos:
            # which keys of the space this combination's optimizer has: composed once per
            # combination of the other keys (the seed changes no key)
            other = tuple(o for o in combo if not o.startswith("seed="))
            if other not in present_of:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(combo))
                present_of[other] = [k for k in self.space if OmegaConf.select(cfg, k) is not None]
            present = present_of[other]
            for t, point in enumerate(points):
                jobs.append(
                    [*combo, *(f"{k}={point[k]}" for k in present), f"{budget.TRIAL_KEY}={t}"]
                )
        return jobs

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        jobs = self.job_overrides(arguments)
        size = self.max_batch_size or len(jobs)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, first = [], 0
        for i in range(0, len(jobs), size):
            batch = jobs[i : i + size]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=first)
            for r in results:
                _ = r.return_value  # re-raises a job's exception, as the basic sweeper does
            first += len(batch)
            returns.append(results)
        return returns
