"""Checks that run before Hydra starts a job: the command line, and every job of a sweep.

Hydra reports a config it cannot compose (``norm=foo``, ``optim.lrr=0.1``, an override it
cannot parse) in 6 to 11 lines and exits 1, before the task function runs.
:func:`check_command_line` composes the command's config first, with Hydra's public compose
API, and turns the same errors into one line (exit 2) that keeps what Hydra says: its list of
available options, its ``+key=value`` hint, plus the closest existing key
(``did you mean optim.lr?``).

A sweep (``-m``) used to find a bad value only when the job holding it started: the jobs
before it ran and were tracked, the jobs after it never ran. :func:`check_sweep` composes the
config of *every* job of the basic sweeper's grid and runs the checks the job itself runs
(:func:`rescalelab.validate.validate`, ``+key`` checks, the launch checks, the store), so a
bad job stops the sweep before anything is tracked, with one line naming the job and the key.
It costs one ``compose`` per job (as Hydra's sweeper composes every job once more
before launching). Sweepers that choose their jobs as they go (Optuna) are checked on the
sweep's own config; each trial is checked again when it starts.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rescalelab.errors import ConfigError
from rescalelab.validate import check_added_keys, check_targets, validate

CONFIG_MODULE, CONFIG_NAME = "rescalelab.conf", "train"
MULTIRUN_FLAGS = ("-m", "--multirun")
PRINT_FLAGS = ("--cfg", "-c", "--info", "-i")  # Hydra's flags that print instead of running
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def hydra_error_line(error: BaseException) -> str:
    """Hydra's multi-line message as one line: indented lists joined by commas, the config
    search path left out, ``In 'train': `` dropped."""
    parts: list[str] = []
    for line in str(error).splitlines():
        if line.startswith("Config search path"):
            break
        if line.startswith("\t") and parts:
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
        elif line.strip():
            parts.append(line.strip().rstrip("."))
    text = "; ".join(parts) or type(error).__name__
    return re.sub(r"^In '[^']*': ", "", text)


def _parse_error(overrides: list[str], error: OverrideParseException) -> ConfigError:
    parser = OverridesParser.create()
    for text in overrides:
        try:
            parser.parse_overrides([text])
        except OverrideParseException as e:
            return ConfigError(f"cannot parse the override {text!r}: {hydra_error_line(e)}")
    return ConfigError(hydra_error_line(error))


def _suggestion(message: str, overrides: list[str]) -> str:
    """``; did you mean optim.lr?`` for ``Could not override 'optim.lrr'``, from the keys of
    the config composed without that override."""
    match = re.search(r"Could not override '([^']+)'", message)
    if match is None:
        return ""
    key = match.group(1)
    parent, _, name = key.rpartition(".")
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("~") != key]
    try:
        cfg = compose(CONFIG_NAME, overrides=rest)
    except HydraException:
        return ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return ""
    close = difflib.get_close_matches(name, [str(k) for k in node], n=1)
    return f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""


def compose_or_explain(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    """``compose`` under an initialized Hydra; its errors as one-line :class:`ConfigError`."""
    try:
        return compose(CONFIG_NAME, overrides=overrides, return_hydra_config=hydra_config)
    except OverrideParseException as e:
        raise _parse_error(overrides, e) from None
    except HydraException as e:
        line = hydra_error_line(e)
        raise ConfigError(line + _suggestion(line, overrides)) from None


def check_command_line(argv: list[str]) -> None:
    """Compose the config of ``rescalelab-train <argv>``: a :class:`ConfigError` where Hydra
    would fail. Sweep overrides are left to :func:`check_sweep` (Hydra, too, applies them per
    job; without ``-m`` Hydra reports them itself). Command lines with other Hydra flags (``--cfg``, ``-cn``, ``--help`` …), and
    ``HYDRA_FULL_ERROR=1``, are left to Hydra."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    modes = [a for a in argv if a in (*MULTIRUN_FLAGS, *PRINT_FLAGS)]
    if len(modes) > 1:  # Hydra raises a ValueError with a traceback for this
        raise ConfigError(
            f"{' '.join(modes)}: Hydra takes one of -m, --cfg, --info at a time "
            "(to see a sweep's config: drop -m, e.g. rescalelab-train experiment=X --cfg job)"
        )
    if any(a.startswith("-") and a not in MULTIRUN_FLAGS for a in argv):
        return
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise _parse_error(overrides, e) from None
    # Sweep overrides are applied per job (by -m, or by hydra.mode=MULTIRUN in a preset such
    # as hparams_search=optuna_lr): the primary config is composed without them, as Hydra does.
    overrides = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose_or_explain(overrides, hydra_config=True)
    # A single run's values too: here the answer comes before the slow imports; in the job it
    # would come after the imports of torch, Lightning and MLflow. A sweep's jobs are checked
    # one by one by check_sweep.
    if not any(a in MULTIRUN_FLAGS for a in argv) and cfg.hydra.mode != RunMode.MULTIRUN:
        validate(_outside_hydra(cfg))


def _outside_hydra(cfg: DictConfig) -> DictConfig:
    """The job's config without the ``hydra`` node, with the values that only Hydra's running
    job knows (``${hydra:runtime.output_dir}``) replaced by the text ``<hydra>``."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "hydra"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return "<hydra>" if isinstance(node, str) and "${hydra:" in node else node

    return OmegaConf.create(strip(OmegaConf.to_container(cfg, resolve=False)))


def job_overrides(
    task_overrides: list[str], sweeper_params: dict[str, Any] | None
) -> list[list[str]]:
    """The overrides of every job, in the basic sweeper's order: ``hydra.sweeper.params`` then
    the command line, one key per axis (a later value of a key replaces the earlier one in
    place), the cartesian product of the axes."""
    texts = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(task_overrides)
    axes: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(texts):
        key = o.get_key_element()
        if not o.is_sweep_override():
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            raise ConfigError(
                f"{o.input_line} is invalid: the basic sweeper sweeps lists of values "
                "(key=a,b,c or choice/range), not intervals; use hparams_search=optuna_lr"
            )
    return [list(job) for job in itertools.product(*axes.values())]


def check_job(cfg: DictConfig, overrides: list[str], stores: set[str] | None = None) -> None:
    """What a job checks before anything is built: values (the rules and each constructor's
    own checks), ``+`` keys, the launch, the store
    (unless its URI is in ``stores``, the stores already checked; it is added)."""
    from rescalelab.distributed import check_launch
    from rescalelab.tracking.store import check_store

    validate(cfg)
    check_targets(cfg)  # each constructor's own argument checks (imports the targets)
    check_added_keys(cfg, overrides)
    check_launch(cfg)
    uri = OmegaConf.select(cfg, "logger.tracking_uri", default=None)
    if uri is not None and (stores is None or str(uri) not in stores):
        check_store(str(uri))
        if stores is not None:
            stores.add(str(uri))


def check_launcher(config: DictConfig) -> None:
    """The launcher's own settings that it would only reject once the sweep is running."""
    n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs", default=None)
    if n_jobs is not None and (
        not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or not n_jobs
    ):
        raise ConfigError(
            f"hydra.launcher.n_jobs={n_jobs!r} is invalid: expected an integer >= 1 "
            "(or -1: one worker per CPU, -2: all but one, ...)"
        )


def check_sweep(config: DictConfig, task_overrides: list[str], swept: list[str]) -> None:
    """Every job of the multirun ``config`` composed and checked, under the running Hydra app.

    Raises a :class:`ConfigError` naming the first bad job: ``job 1 (optim.lr=-1): …``.
    """
    check_launcher(config)
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if sweeper != BASIC_SWEEPER:  # the sweeper picks its jobs as it goes: its base config
        check_job(config, list(task_overrides))
        return
    params = OmegaConf.to_container(params, resolve=True) if params is not None else None
    checked_stores: set[str] = set()
    for num, overrides in enumerate(job_overrides(task_overrides, params)):
        try:
            check_job(compose_or_explain(overrides), overrides, checked_stores)
        except ConfigError as e:
            named = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in swept]
            raise ConfigError(f"job {num} ({' '.join(named or overrides)}): {e}") from None
