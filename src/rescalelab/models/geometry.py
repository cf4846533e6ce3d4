"""share and fanin of every Conv2d/Linear layer, measured on the real input size.

For a layer with weight w_ij feeding unit j:

* fanin = number of inputs of one unit: ``in_features`` for Linear,
  ``in_channels · kh · kw / groups`` for Conv2d;
* share = number of positions at which one weight is used per example: ``H_out · W_out`` for
  Conv2d, 1 for Linear.

Both the per-layer stepsize heuristic (stepsize × 1/sqrt(share × fanin)) and the whitening β
(β_j² = 1/sqrt(share × fanin)) read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

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
def layer_geometry(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerGeometry]:
    """Run one dummy example through ``model`` and record share and fanin per layer."""
    out_sizes: dict[str, int] = {}
    hooks = []
    for name, layer in rescalable_layers(model):
        if isinstance(layer, nn.Conv2d):

            def hook(mod, inp, out, name=name):
                out_sizes[name] = out.shape[-2] * out.shape[-1]

            hooks.append(layer.register_forward_hook(hook))
    was_training = model.training
    model.eval()  # BatchNorm must not update its running statistics here
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    geometry = {}
    for name, layer in rescalable_layers(model):
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            fanin = layer.in_channels * kh * kw // layer.groups
            share = out_sizes[name]
        else:
            fanin, share = layer.in_features, 1
        geometry[name] = LayerGeometry(name, share, fanin)
    return geometry
