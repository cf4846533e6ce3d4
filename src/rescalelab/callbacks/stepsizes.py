"""``callbacks.stepsizes``: the stepsize each layer's update really applies, and its early warnings.

Methods that rescale differently can share ``optim.lr`` and still take steps orders of magnitude
apart. :class:`StepsizeMonitor` logs, for every Conv2d/Linear layer ``<layer>`` (the names of
``rescalable_layers``), the factor by which the update multiplies the raw gradient ``∂E/∂w_ij``
(ignoring momentum), with ``α`` the group's stepsize (``train/lr/<group>``: the base stepsize
times its layer scale and schedule factor):

* SG, no rescaling or BatchNorm: ``α`` itself;
* ``param_groups.layer_scale=fanin``: ``α = lr/√(share·fanin)`` (the group's stepsize);
* whitening (``norm=whitening``, and ``bn_warmup`` after its switch): ``α β² α_i²`` per input
  ``i``, with ``α_i² = 1/(Var_i + ε)`` and ``β² = 1/√(share·fanin)`` read from the layer's
  ``rescale_var`` and ``rescale_beta2`` buffers (``docs/whitening.md``);
* the Adam family, per weight coordinate, from the optimizer state: Adam/AdamW
  ``α/(√v̂ + ε)`` with ``v̂ = v/(1 − β₂^t)`` (the factor applied to the bias-corrected first
  moment ``m̂``), RMSProp ``α/(√v + ε)`` (``v − ḡ²`` when centered), AdaGrad
  ``α_t/(√Σg² + ε)`` with ``α_t = α/(1 + (t − 1)·lr_decay)``; times ``β² α_i²`` when whitened
  (``v`` then accumulates the whitened gradient, so the product is the factor on the raw one).

Every epoch, at its last step (the step of the epoch's last ``train/loss`` point):

* ``stepsizes/<layer>/min``, ``median``, ``max`` of that factor over the layer's inputs (SG) or
  weight coordinates (Adam family); one value for SG without whitening;
* ``stepsizes/<layer>/update_ratio`` = ‖Δw‖/‖w‖ of that step's update (the weight, before it);
* whitened layers: ``stepsizes/<layer>/low_var``, the number of inputs whose running variance
  is below ``var_threshold`` (where ``α_i² → 1/ε`` explodes), and ``stepsizes/<layer>/max_scale``
  = max_i ``β² α_i²``; their totals ``stepsizes/low_var`` (sum) and ``stepsizes/max_scale`` (max).

At every logging step (``trainer.log_every_n_steps``) it also logs the whitened layers'
``low_var`` and ``max_scale`` (and the totals): the early warning of whitening's revived-unit
instability (a nearly-dead ReLU input has ``Var ≈ 0``, so ``β²α²`` reaches ``β²/ε``). These are a
couple of reductions over ``[n_in]`` buffers, one host copy per logging step; the epoch record
adds one weight copy and a median per layer once per epoch (its overhead: ``rescalelab-bench
--rows stepsizes``). Rank 0 measures and logs; the model is replicated under DDP.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from rescalelab.errors import FLAG, above, checked, required
from rescalelab.geometry import rescalable_layers

ADAPTIVE = ("exp_avg_sq", "square_avg", "sum")  # Adam(W), RMSprop, Adagrad state keys


def whitening_scales(plug: Any) -> dict[int, Tensor]:
    """``β² α_i²`` per input of every whitened layer, keyed by ``id(module)``, as the gradient
    transform applies it (the knobs for α included: ``WhitenedLayers.input_scale``); empty
    without a whitening plug (``norm=whitening``, or ``bn_warmup`` once switched)."""
    for candidate in (plug, getattr(plug, "whitening", None)):
        layers = getattr(candidate, "layers", None) if candidate is not None else None
        if getattr(candidate, "name", "") == "whitening" and layers is not None:
            return {id(la.module): layers.input_scale(la).float() for la in layers.layers}
    return {}


def adaptive_factor(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], p: Tensor
) -> Tensor | None:
    """Per-coordinate ``α/(√v̂ + ε)`` of the Adam family for ``p`` (``None``: not adaptive yet)."""
    state = optimizer.state.get(p) or {}
    lr, eps = float(group["lr"]), float(group.get("eps", 1e-8))
    step = float(state.get("step", 0))
    if "exp_avg_sq" in state and step > 0:  # Adam, AdamW (torch's update: lr/bc1 · m/(√v/√bc2 + ε))
        v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state["exp_avg_sq"]
        v_hat = v.float() / (1 - group["betas"][1] ** step)
        return lr / (v_hat.sqrt() + eps)
    if "square_avg" in state:  # RMSprop
        v = state["square_avg"].float()
        if group.get("centered") and "grad_avg" in state:
            v = v - state["grad_avg"].float().square()
        return lr / (v.clamp_min(0).sqrt() + eps)
    if "sum" in state and step > 0:  # Adagrad
        clr = lr / (1 + (step - 1) * float(group.get("lr_decay", 0.0)))
        return clr / (state["sum"].float().sqrt() + eps)
    return None


def _columns(layer: nn.Module, per_input: Tensor) -> Tensor:
    """A per-input vector ``[n_in]`` expanded to the weight's shape ``[out, in, (kh, kw)]``."""
    w = layer.weight
    if isinstance(layer, nn.Conv2d):
        g = layer.groups
        if g > 1:  # unit j reads the channels of its group only
            per_input = per_input.view(g, -1).repeat_interleave(layer.out_channels // g, 0)
            return per_input.view(w.shape[0], -1, 1, 1).expand_as(w)
        return per_input.view(1, -1, 1, 1).expand_as(w)
    return per_input.view(1, -1).expand_as(w)


@checked("callbacks.stepsizes", var_threshold=required(above(0)), per_step=FLAG)
class StepsizeMonitor(pl.Callback):
    """Effective stepsizes per layer every epoch; near-zero-variance inputs every logging step.

    Args:
        var_threshold: an input's running variance below this counts as near zero (``low_var``).
        per_step: also log ``low_var`` and ``max_scale`` at every logging step.
    """

    def __init__(self, var_threshold: float = 1e-3, per_step: bool = True) -> None:
        super().__init__()
        self.var_threshold, self.per_step = float(var_threshold), bool(per_step)
        self._step, self._last = 0, False
        self._before: dict[str, Tensor] = {}
        self.last_record: dict[str, float] = {}

    # -- the loop ---------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step
        batches = trainer.num_training_batches
        self._last = (isinstance(batches, int) and batch_idx + 1 >= batches) or bool(
            trainer.is_last_batch
        )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._last and trainer.is_global_zero:  # once an epoch: the weights before the step
            self._before = {
                name: layer.weight.detach().clone()
                for name, layer in rescalable_layers(pl_module.model)
            }

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if not trainer.is_global_zero:
            return
        every = max(int(trainer.log_every_n_steps or 0), 1)
        logging = self.per_step and (self._step + 1) % every == 0
        if not (logging or self._last):
            return
        record = self.measure(trainer, pl_module, epoch=self._last)
        self._before = {}
        if record:
            self.last_record = record
            for logger in trainer.loggers:
                logger.log_metrics(record, step=self._step)

    # -- the measurement --------------------------------------------------------------------
    @torch.no_grad()
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: bool = True
    ) -> dict[str, float]:
        """The metrics of the module docstring (``epoch=False``: the per-step subset only)."""
        scales = whitening_scales(getattr(pl_module, "norm", None))
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        group_of: dict[int, dict[str, Any]] = {}
        if optimizer is not None:
            for g in optimizer.param_groups:
                group_of.update({id(p): g for p in g["params"]})
        names: list[str] = []
        values: list[Tensor] = []
        low_total: list[Tensor] = []
        top: list[Tensor] = []
        for name, layer in rescalable_layers(pl_module.model):
            scale = scales.get(id(layer))
            if scale is not None:
                low = (layer.rescale_var < self.var_threshold).sum().float()
                big = scale.max()
                names += [f"stepsizes/{name}/low_var", f"stepsizes/{name}/max_scale"]
                values += [low, big]
                low_total.append(low)
                top.append(big)
            if not epoch:
                continue
            group = group_of.get(id(layer.weight))
            if group is not None:
                adaptive = adaptive_factor(optimizer, group, layer.weight)
                if adaptive is not None:
                    factor = adaptive * _columns(layer, scale) if scale is not None else adaptive
                else:
                    one = layer.weight.new_ones(1, dtype=torch.float32)
                    factor = float(group["lr"]) * (scale if scale is not None else one)
                factor = factor.reshape(-1).float()
                names += [f"stepsizes/{name}/{s}" for s in ("min", "median", "max")]
                values += [factor.min(), factor.median(), factor.max()]
            before = self._before.get(name)
            if before is not None and before.shape == layer.weight.shape:
                delta = (layer.weight.detach() - before).norm()
                names.append(f"stepsizes/{name}/update_ratio")
                values.append(delta / before.norm().clamp_min(1e-30))
        if low_total:
            names += ["stepsizes/low_var", "stepsizes/max_scale"]
            values += [torch.stack(low_total).sum(), torch.stack(top).max()]
        if not values:
            return {}
        host = torch.stack([v.reshape(()).float() for v in values]).tolist()  # one host copy
        return dict(zip(names, host))
