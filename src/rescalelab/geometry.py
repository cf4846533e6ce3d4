"""share and fanin of every Conv2d/Linear layer, measured on the real input size.

For a layer with weight w_ij feeding unit j:

* fanin = number of inputs of one unit: ``in_features`` for Linear,
  ``in_channels · kh · kw / groups`` for Conv2d;
* share = number of positions at which one weight is used per example: ``H_out · W_out`` for
  Conv2d, 1 for Linear.

Both the per-layer stepsize heuristic (stepsize × 1/sqrt(share × fanin)) and the whitening β
(β_j² = 1/sqrt(share × fanin)) read them from here. The models, the norm plugs and the
optimizer all use this module, which imports none of them: it is computed once per fit
(``fit.build_components``) and passed on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LayerGeometry:
    name: str
    share: int
    fanin: int

    @property
    def scale(self) -> float:
        """1/sqrt(share × fanin): the fan-in stepsize multiplier, equal to β_j²."""
        return float(self.share * self.fanin) ** -0.5


def rescalable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Conv2d and Linear layers of ``model`` in forward-definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def dummy_forward(model: nn.Module, input_shape: tuple[int, ...], handles: Iterable[Any]) -> None:
    """Run one zero example of ``input_shape`` through ``model`` in eval mode, then remove the
    hook ``handles``. Eval mode: BatchNorm must not update its running statistics here."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def layer_geometry(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerGeometry]:
    """Run one dummy example through ``model`` and record share and fanin per layer."""
    out_sizes: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            out_sizes[name] = out.shape[-2] * out.shape[-1]

        return record

    layers = rescalable_layers(model)
    dummy_forward(model, input_shape, [
        layer.register_forward_hook(hook(name))
        for name, layer in layers if isinstance(layer, nn.Conv2d)
    ])  # fmt: skip
    geometry = {}
    for name, layer in layers:
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            fanin = layer.in_channels * kh * kw // layer.groups
            share = out_sizes[name]
        else:
            fanin, share = layer.in_features, 1
        geometry[name] = LayerGeometry(name, share, fanin)
    return geometry
