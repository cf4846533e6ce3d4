"""Optimizers with parameter groups, per-layer stepsizes and stepsize schedules.

An ``optim`` config is a torch optimizer ``_target_`` (``_partial_: true``) plus two keys that
rescalelab consumes to build parameter groups before the optimizer is instantiated:

* ``layer_scale``: ``none`` (one common stepsize) or ``fanin`` (stepsize of each Conv2d/Linear
  layer multiplied by 1/sqrt(share × fanin), the lecture's fan-in heuristic);
* ``decay_exclude``: when true, biases and normalization parameters get no weight decay.

A ``schedule`` config is a ``_partial_`` factory ``f(optimizer) -> LRScheduler`` (see
:mod:`rescalelab.optim.schedules`) plus ``interval`` (``step`` or ``epoch``) and ``frequency``, also consumed here.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from rescalelab.errors import ConfigError
from rescalelab.geometry import LayerGeometry, rescalable_layers

OPTIM_KEYS = ("layer_scale", "decay_exclude")
SCHEDULE_KEYS = ("interval", "frequency")
LAYER_SCALES = ("none", "fanin")


def _split(cfg: DictConfig, keys: tuple[str, ...]) -> tuple[dict[str, Any], DictConfig]:
    """Separate rescalelab's own keys from the optimizer/scheduler constructor's."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    own = {k: plain.pop(k) for k in keys if k in plain}
    return own, OmegaConf.create(plain)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_scale: str = "none",
    decay_exclude: bool = False,
    geometry: dict[str, LayerGeometry] | None = None,
) -> list[dict[str, Any]]:
    """One group per Conv2d/Linear layer (named after it), plus ``other`` for the rest.

    With ``layer_scale=fanin`` group ``l`` gets ``lr × (share_l × fanin_l)^(-1/2)``.
    With ``decay_exclude`` biases and parameters outside Conv2d/Linear weights (BatchNorm γ, β)
    are placed in ``<group>.no_decay`` groups with ``weight_decay=0``.
    """
    if layer_scale not in LAYER_SCALES:
        raise ConfigError(
            f"optim.layer_scale={layer_scale} is invalid: expected one of {LAYER_SCALES}"
        )
    if layer_scale == "fanin" and geometry is None:
        raise ValueError("layer_scale=fanin needs the layer geometry")
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name, layer in rescalable_layers(model):
        scale = geometry[name].scale if layer_scale == "fanin" and geometry else 1.0
        decayed, plain = weight_params(layer)
        plain += [layer.bias] if layer.bias is not None else []
        if not decay_exclude:
            decayed, plain = decayed + plain, []
        for suffix, params, wd in (("", decayed, weight_decay), (".no_decay", plain, 0.0)):
            params = [p for p in params if p.requires_grad]
            if params:
                groups.append(
                    {
                        "name": name + suffix,
                        "params": params,
                        "lr": lr * scale,
                        "weight_decay": wd,
                        "lr_scale": scale,
                    }
                )
                seen.update(id(p) for p in params)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if rest:
        groups.append(
            {
                "name": "other",
                "params": rest,
                "lr": lr,
                "weight_decay": 0.0 if decay_exclude else weight_decay,
                "lr_scale": 1.0,
            }
        )
    return groups


def weight_params(layer: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(weights, gains)`` that make up ``layer.weight``.

    A plain layer's weight is one parameter. A parametrized one (``norm=weightnorm``:
    ``w = g·v/‖v‖``) is computed from its originals: those shaped like ``w`` (``v``) are
    weights, the others (``g``) normalization gains, kept out of weight decay by
    ``decay_exclude`` as BatchNorm's γ is.
    """
    if not parametrize.is_parametrized(layer, "weight"):
        return [layer.weight], []
    shape = layer.weight.shape
    originals = list(layer.parametrizations.weight.parameters())
    return (
        [p for p in originals if p.shape == shape],
        [p for p in originals if p.shape != shape],
    )


def build_optimizer(
    cfg: DictConfig, model: nn.Module, geometry: dict[str, LayerGeometry] | None
) -> torch.optim.Optimizer:
    """Instantiate ``cfg`` (a partial torch optimizer) on the parameter groups of ``model``."""
    own, ctor = _split(cfg, OPTIM_KEYS)
    lr = float(ctor.get("lr", 1e-3))
    groups = param_groups(
        model,
        lr=lr,
        weight_decay=float(ctor.get("weight_decay", 0.0)),
        layer_scale=str(own.get("layer_scale", "none")),
        decay_exclude=bool(own.get("decay_exclude", False)),
        geometry=geometry,
    )
    return instantiate(ctor)(groups)


def build_scheduler(
    cfg: DictConfig,
    optimizer: torch.optim.Optimizer,
    total_steps: int | float | None = None,
    total_epochs: int | None = None,
) -> dict[str, Any]:
    """Instantiate ``cfg`` (a partial scheduler factory) in Lightning's scheduler-dict form.

    ``total_steps`` / ``total_epochs`` (the run's length, known once a trainer exists) fill a
    ``period: null`` key (``schedule=cosine``) in the schedule's own unit, and a
    ``steps_per_epoch: null`` key (``schedule=warmup_cosine``). Schedules that watch
    the training loss (``schedule=halving schedule.mode=plateau``) are stepped like the others:
    they receive the loss of every step through :func:`observe_loss`, not through Lightning's
    ``monitor`` (which only sees the steps that are logged).
    """
    own, ctor = _split(cfg, SCHEDULE_KEYS)
    interval = own.get("interval", "step")
    if interval not in ("step", "epoch"):
        raise ConfigError(f"schedule.interval={interval} is invalid: expected 'step' or 'epoch'")
    if "period" in ctor and ctor.period is None:
        length = total_steps if interval == "step" else total_epochs
        ok = length is not None and 0 < length < float("inf")
        ctor.period = int(length) if ok else None
    if "steps_per_epoch" in ctor and ctor.steps_per_epoch is None:
        ctor.steps_per_epoch = _steps_per_epoch(interval, total_steps, total_epochs)
    scheduler = instantiate(ctor)(optimizer)
    return {
        "scheduler": scheduler, "interval": interval, "frequency": int(own.get("frequency", 1)),
        "reduce_on_plateau": False,  # SmoothedPlateau observes the loss itself
    }  # fmt: skip


def _steps_per_epoch(
    interval: str, total_steps: int | float | None, total_epochs: int | None
) -> int | None:
    """Scheduler steps per epoch (``schedule=warmup_cosine``): 1 per epoch, or the run's
    optimizer steps divided by its epochs; ``None`` while the run length is unknown."""
    if interval == "epoch":
        return 1
    known = total_steps is not None and 0 < total_steps < float("inf")
    if not known or not total_epochs or total_epochs < 1:
        return None
    return max(1, round(total_steps / total_epochs))


def observe_loss(trainer: pl.Trainer, loss: torch.Tensor) -> None:
    """Hand this step's training loss to every schedule that watches it (``observe(loss)``).

    Costs nothing unless such a schedule is configured; under DDP the value is the mean over
    ranks, so that every rank takes the same decision.
    """
    watchers = [
        c.scheduler for c in trainer.lr_scheduler_configs if hasattr(c.scheduler, "observe")
    ]
    if watchers:
        value = trainer.strategy.reduce(loss.detach(), reduce_op="mean")
        for scheduler in watchers:
            scheduler.observe(value)
