"""Normalization plugs: what a model puts after each hidden Conv2d/Linear layer.

Models never import a normalization choice. They receive a plug and ask it, for every hidden
layer, ``plug.conv(channels)`` / ``plug.linear(features)`` for the module that follows the
layer (``nn.Identity`` for no normalization, BatchNorm for ``norm=bn``). A plug may also
``prepare`` the built model with its layer geometry (register statistics, wrap layers), act on
the gradients ``before_optimizer_step`` (``norm=whitening`` uses those two) and bring the
Lightning callbacks it needs (``norm=bn_warmup``: the switch). The interface is
:class:`~rescalelab.norm.plug.NormPlug`; the plugs depend on ``rescalelab.geometry`` only, never
on the models.

Options: ``none`` (:class:`NoNorm`), ``bn`` (:class:`BatchNorm`), ``whitening``
(:class:`~rescalelab.norm.whitening.Whitening`, the Lafond–Vasilache–Bottou reparametrization
as a gradient transform) and ``bn_warmup`` (:class:`~rescalelab.norm.bn_warmup.BnWarmup`, BN
epochs then an exact switch to whitening; the BN folding lives in ``rescalelab.norm.fold``).
The comparison baselines (docs/baselines.md): ``layernorm``, ``groupnorm``
(``rescalelab.norm.batch_independent``), ``weightnorm`` (``rescalelab.norm.weight_norm``) and
``batch_renorm`` (``rescalelab.norm.batch_renorm``).
"""

from __future__ import annotations

from torch import nn

from rescalelab.errors import FLAG, checked
from rescalelab.norm.batch_independent import GroupNorm, LayerNorm
from rescalelab.norm.batch_renorm import BatchRenormPlug
from rescalelab.norm.bn_warmup import BnWarmup
from rescalelab.norm.plug import EPS, MOMENTUM, NormPlug
from rescalelab.norm.weight_norm import WeightNorm
from rescalelab.norm.whitening import Whitening


class NoNorm(NormPlug):
    """``norm=none``: plain layers, one stepsize unless ``param_groups.layer_scale`` says not."""

    name = "none"


@checked("norm", momentum=MOMENTUM, eps=EPS, sync=FLAG)
class BatchNorm(NormPlug):
    """``norm=bn``: BatchNorm after every conv/linear layer except the output layer.

    ``momentum`` has torch's meaning (weight of the new batch in the running averages).
    ``sync=true`` turns every BatchNorm into SyncBatchNorm under DDP, so that the batch
    statistics are those of the global batch.
    """

    name = "bn"

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, sync: bool = False) -> None:
        self.momentum, self.eps, self.sync = momentum, eps, sync

    def conv(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum)

    def linear(self, features: int) -> nn.Module:
        return nn.BatchNorm1d(features, eps=self.eps, momentum=self.momentum)


__all__ = [
    "BatchNorm",
    "BatchRenormPlug",
    "BnWarmup",
    "GroupNorm",
    "LayerNorm",
    "NoNorm",
    "NormPlug",
    "WeightNorm",
    "Whitening",
]
