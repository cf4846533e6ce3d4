"""Fold every BatchNorm into the Conv2d/Linear layer it follows (eval-mode function preserved).

A BatchNorm in eval mode is the per-channel affine map ``y ↦ γ (y − mean)/sqrt(var + ε) + β``
with its running ``mean``, ``var``. After a layer ``y = w x + b`` it folds into

    w' = w · γ/sqrt(var + ε)            (per output unit / channel j)
    b' = (b − mean) · γ/sqrt(var + ε) + β

and the BatchNorm is replaced by ``nn.Identity``: the plain network computes the eval-mode
outputs of the BN network (to float rounding). A layer without bias gets one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rescalelab.geometry import dummy_forward

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm1d/2d/3d and SyncBatchNorm


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def batchnorm_pairs(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` names for every BatchNorm whose input is a Conv2d/Linear output.

    Found by running one dummy example in eval mode and matching tensors, so it works for any
    model whatever its module nesting. Raises ``ValueError`` if some BatchNorm reads anything
    else (it could not be folded exactly).
    """
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    unpaired: list[str] = []

    def keep(name: str) -> Any:
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            outputs[id(out)] = (name, out)  # holding ``out`` keeps its id unique

        return hook

    def match(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            hit = outputs.get(id(args[0]))
            if hit is not None and hit[1] is args[0]:
                pairs.append((hit[0], name))
            else:
                unpaired.append(name)

        return hook

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(keep(name)))
        elif isinstance(m, BN_TYPES):
            handles.append(m.register_forward_pre_hook(match(name)))
    dummy_forward(model, input_shape, handles)
    if unpaired:
        raise ValueError(
            f"cannot fold BatchNorm {unpaired}: its input is not a Conv2d/Linear output"
        )
    return pairs


@torch.no_grad()
def fold_into(layer: nn.Conv2d | nn.Linear, bn: nn.Module) -> None:
    """Fold ``bn``'s eval-mode affine map into ``layer``'s weight and bias, in place."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    w = layer.weight
    w.copy_(w.double() * scale.view(-1, *([1] * (w.dim() - 1))))
    bias = layer.bias.double() * scale if layer.bias is not None else 0.0
    new_bias = (bias + shift).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def replace_batchnorms(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Replace the BatchNorm of every pair by ``nn.Identity`` (no folding: the structure only)."""
    for _, bn_name in pairs:
        _set_submodule(model, bn_name, nn.Identity())


def ensure_biases(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Give every paired layer a bias (as folding does), with zeros, for structure-only rebuilds."""
    for layer_name, _ in pairs:
        layer = model.get_submodule(layer_name)
        if layer.bias is None:
            layer.bias = nn.Parameter(
                torch.zeros(layer.weight.shape[0], device=layer.weight.device)
            )


def fold_batchnorm(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """Fold every BatchNorm of ``model`` into its layer and remove it; return the pairs folded."""
    pairs = batchnorm_pairs(model, input_shape)
    paired = {bn for _, bn in pairs}
    unused = [n for n, m in model.named_modules() if isinstance(m, BN_TYPES) and n not in paired]
    if unused:
        raise ValueError(f"cannot fold BatchNorm {unused}: it is not used in the forward pass")
    for layer_name, bn_name in pairs:
        fold_into(model.get_submodule(layer_name), model.get_submodule(bn_name))
    replace_batchnorms(model, pairs)
    return pairs
