"""``norm=batch_renorm``: batch renormalization (Ioffe, 2017).

In training mode, for the minibatch mean ``μ_B`` and standard deviation ``σ_B = sqrt(Var_B + ε)``
(biased, per channel, pooled over batch and positions) and the running ``μ``, ``σ = sqrt(Var + ε)``:

    r = stop_grad(clip(σ_B/σ, 1/r_max, r_max)),   d = stop_grad(clip((μ_B − μ)/σ, −d_max, d_max)),
    ŷ = γ ((x − μ_B)/σ_B · r + d) + β,

and in eval mode ``ŷ = γ (x − μ)/σ + β`` as BatchNorm. ``r``, ``d`` correct the batch statistics
towards the running ones, so training computes (nearly) the eval-mode function while the
gradient still flows through ``μ_B``, ``σ_B``. With ``r_max = 1``, ``d_max = 0`` this is exactly
BatchNorm in training mode. The running ``μ``, ``Var`` follow torch BatchNorm's rule
(``μ ← (1 − ρ)μ + ρ μ_B``, ``Var ← (1 − ρ)Var + ρ s²_B`` with the unbiased ``s²_B``,
``ρ = momentum``).

**The limits are relaxed on a schedule**, as in the paper (r_max = 1, d_max = 0 for the first
5000 steps, then r_max → 3 over 40k steps and d_max → 5 over 25k steps): with ``k`` the layer's
training batches so far (``num_batches_tracked``, saved in checkpoints),

    r_max(k) = 1 + (r_max − 1) · clip((k − relax_start)/r_relax_steps, 0, 1),
    d_max(k) = d_max · clip((k − relax_start)/d_relax_steps, 0, 1).

The limits are computed on the device from the counter (no host synchronisation per step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rescalelab.errors import Expect, at_least, checked, number_at_least
from rescalelab.norm.plug import EPS, MOMENTUM, NormPlug

# The keys of the schedule, declared on :class:`Relaxation` (which a BatchRenorm module builds)
# and on :class:`BatchRenormPlug` (whose config node holds them).
RELAXATION = {
    "r_max": Expect(float, lambda v: v >= 1, "a number >= 1"),
    "d_max": number_at_least(0),
    "relax_start": at_least(0),
    "r_relax_steps": at_least(0),
    "d_relax_steps": at_least(0),
}


def _ramp(k: Tensor, start: int, steps: int) -> Tensor:
    """clip((k − start)/steps, 0, 1); a step from 0 to 1 at ``start`` when ``steps`` is 0."""
    if steps == 0:
        return (k >= start).to(torch.float32)
    return ((k.to(torch.float32) - start) / steps).clamp(0.0, 1.0)


@checked("norm", **RELAXATION)
@dataclass(frozen=True)
class Relaxation:
    """The schedule of the limits: ``r_max(k)``, ``d_max(k)`` of the module docstring."""

    r_max: float = 3.0
    d_max: float = 5.0
    relax_start: int = 5000
    r_relax_steps: int = 40000
    d_relax_steps: int = 25000

    def limits(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """``(r_max(k), d_max(k))`` after ``k`` training batches (on ``k``'s device)."""
        r = 1.0 + (self.r_max - 1.0) * _ramp(k, self.relax_start, self.r_relax_steps)
        d = self.d_max * _ramp(k, self.relax_start, self.d_relax_steps)
        return r, d


class BatchRenorm(nn.Module):
    """Batch renormalization of dim 1 (channels) of a ``(N, C)`` or ``(N, C, H, W)`` input.

    ``eps``, ``momentum`` as in BatchNorm; the other keywords are those of :class:`Relaxation`.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, **relaxation: Any
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.relaxation = Relaxation(**relaxation)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def limits(self) -> tuple[Tensor, Tensor]:
        """``(r_max(k), d_max(k))`` at the current counter ``k``."""
        return self.relaxation.limits(self.num_batches_tracked)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        if not self.training:
            scale = torch.rsqrt(self.running_var + self.eps)
            xhat = (x - self.running_mean.view(shape)) * scale.view(shape)
        else:
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            std_b = torch.sqrt(var + self.eps)
            with torch.no_grad():
                r_lim, d_lim = self.limits()
                std = torch.sqrt(self.running_var + self.eps)
                r = torch.minimum(torch.maximum(std_b / std, 1.0 / r_lim), r_lim)
                d = torch.minimum(torch.maximum((mean - self.running_mean) / std, -d_lim), d_lim)
                n = x.numel() / x.shape[1]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1.0, 1.0), self.momentum)
                self.num_batches_tracked.add_(1)
            xhat = (x - mean.view(shape)) / std_b.view(shape) * r.view(shape) + d.view(shape)
        return xhat * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, {self.relaxation}"


@checked("norm", momentum=MOMENTUM, eps=EPS, **RELAXATION)
class BatchRenormPlug(NormPlug):
    """``norm=batch_renorm``: :class:`BatchRenorm` after every hidden conv/linear layer.

    ``momentum``, ``eps`` as in BatchNorm; the other keywords are those of :class:`Relaxation`
    (the paper's schedule by default). They are named here, not passed as ``**kwargs``, so that
    the config node's keys are this constructor's parameters and its checks.
    """

    name = "batch_renorm"

    def __init__(
        self,
        momentum: float = 0.1,
        eps: float = 1e-5,
        r_max: float = Relaxation.r_max,
        d_max: float = Relaxation.d_max,
        relax_start: int = Relaxation.relax_start,
        r_relax_steps: int = Relaxation.r_relax_steps,
        d_relax_steps: int = Relaxation.d_relax_steps,
    ) -> None:
        self.momentum, self.eps = momentum, eps
        self.relaxation = Relaxation(r_max, d_max, relax_start, r_relax_steps, d_relax_steps)

    def conv(self, channels: int) -> nn.Module:
        return BatchRenorm(channels, self.eps, self.momentum, **asdict(self.relaxation))

    def linear(self, features: int) -> nn.Module:
        return BatchRenorm(features, self.eps, self.momentum, **asdict(self.relaxation))
