"""Optimizers on parameter groups, per-layer stepsizes and stepsize schedules.

Three config nodes, each a plain ``_partial_`` that ``hydra.utils.instantiate`` builds as
written, and that the LightningModule receives built (as in lightning-hydra-template):

* ``optim``: a torch optimizer (``torch.optim.SGD``, …), ``f(groups) -> Optimizer``;
* ``param_groups``: :func:`param_groups`, ``f(model, geometry) -> groups``, with
  ``layer_scale`` (``none``: one common stepsize; ``fanin``: the stepsize of each Conv2d/Linear
  layer times 1/sqrt(share × fanin), the lecture's fan-in heuristic) and ``decay_exclude``
  (true: no weight decay on biases and normalization parameters);
* ``schedule``: a factory of :mod:`rescalelab.optim.schedules`, ``f(optimizer) ->
  LRScheduler``; ``lr_scheduler_config`` (``interval``: ``step`` or ``epoch``, ``frequency``)
  says how Lightning steps it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.lr_scheduler import LRScheduler

from rescalelab.errors import Expect, checked
from rescalelab.geometry import LayerGeometry, rescalable_layers

LAYER_SCALES = ("none", "fanin")
Groups = list[dict[str, Any]]


@checked(
    "param_groups",
    layer_scale=Expect(str, lambda v: v in LAYER_SCALES, "one of: none, fanin"),
    decay_exclude=Expect(bool, allowed="true or false"),
)
def param_groups(
    model: nn.Module,
    geometry: dict[str, LayerGeometry] | None = None,
    layer_scale: str = "none",
    decay_exclude: bool = False,
) -> Groups:
    """One group per Conv2d/Linear layer (named after it), plus ``other`` for the rest.

    Each group holds ``lr_scale``, the factor of the optimizer's stepsize α it trains with
    (:func:`build_optimizer` applies it): 1, or with ``layer_scale=fanin``
    ``(share_l × fanin_l)^(-1/2)`` for layer ``l``. With ``decay_exclude`` biases and parameters
    outside Conv2d/Linear weights (BatchNorm γ, β) are placed in ``<group>.no_decay`` groups
    with ``weight_decay=0``; the other groups take the optimizer's ``weight_decay``.
    """
    if layer_scale == "fanin" and geometry is None:
        raise ValueError("layer_scale=fanin needs the layer geometry")
    groups: Groups = []
    seen: set[int] = set()
    for name, layer in rescalable_layers(model):
        scale = geometry[name].scale if layer_scale == "fanin" and geometry else 1.0
        decayed, plain = weight_params(layer)
        plain += [layer.bias] if layer.bias is not None else []
        if not decay_exclude:
            decayed, plain = decayed + plain, []
        for suffix, params, no_decay in (("", decayed, False), (".no_decay", plain, True)):
            params = [p for p in params if p.requires_grad]
            if params:
                groups.append(_group(name + suffix, params, scale, no_decay))
                seen.update(id(p) for p in params)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if rest:
        groups.append(_group("other", rest, 1.0, decay_exclude))
    return groups


def _group(name: str, params: list[nn.Parameter], scale: float, no_decay: bool) -> dict[str, Any]:
    group: dict[str, Any] = {"name": name, "params": params, "lr_scale": scale}
    return group | ({"weight_decay": 0.0} if no_decay else {})


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
    optimizer: Callable[[Groups], torch.optim.Optimizer],
    groups: Callable[..., Groups],
    model: nn.Module,
    geometry: dict[str, LayerGeometry] | None = None,
) -> torch.optim.Optimizer:
    """``optimizer(groups(model, geometry))``, then group ``l``'s stepsize ``α × lr_scale_l``.

    The groups hold no stepsize of their own: each starts at the optimizer's α (its ``lr``,
    from the partial or the class default) and is scaled here, as a schedule scales it later.
    """
    built = optimizer(groups(model, geometry=geometry))
    for group in built.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return built


def build_scheduler(
    schedule: Callable[..., LRScheduler],
    optimizer: torch.optim.Optimizer,
    lr_scheduler_config: dict[str, Any] | None = None,
    total_steps: int | float | None = None,
    total_epochs: int | None = None,
) -> dict[str, Any]:
    """``schedule(optimizer)`` in Lightning's lr-scheduler-config form.

    ``lr_scheduler_config`` holds Lightning's ``interval`` (``step`` or ``epoch``) and
    ``frequency``. ``total_steps`` / ``total_epochs`` (the run's length, known once a trainer
    exists) fill a ``period=None`` argument (``schedule=cosine``) in the schedule's own unit,
    and a ``steps_per_epoch=None`` one (``schedule=warmup_cosine``). Schedules that watch the
    training loss (``schedule=halving schedule.mode=plateau``) are stepped like the others:
    they receive the loss of every step through :func:`observe_loss`, not through Lightning's
    ``monitor`` (which only sees the steps that are logged).
    """
    config = {"interval": "step", "frequency": 1, **(lr_scheduler_config or {})}
    bound = getattr(schedule, "keywords", {})  # a functools.partial's arguments
    run: dict[str, Any] = {}
    if "period" in bound and bound["period"] is None:
        length = total_steps if config["interval"] == "step" else total_epochs
        run["period"] = int(length) if length is not None and 0 < length < float("inf") else None
    if "steps_per_epoch" in bound and bound["steps_per_epoch"] is None:
        run["steps_per_epoch"] = _steps_per_epoch(config["interval"], total_steps, total_epochs)
    # SmoothedPlateau observes the loss itself: Lightning must not pass it a monitored metric.
    return {"scheduler": schedule(optimizer, **run), **config, "reduce_on_plateau": False}


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
