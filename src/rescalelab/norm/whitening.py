"""``norm=whitening``: the diagonal-rescaling ("whitening") reparametrization of Lafond,
Vasilache & Bottou, implemented as a zero-overhead transform of the ordinary gradients. (One
concept in one file, if a long one: the statistics, the transform and the plug of this one
reparametrization.)

**The reparametrization** (lecture, part 2). Every Conv2d and Linear layer ``y_j = b_j + Σ_i w_ij x_i``
is trained as if it were written

    y_j = β_j ( v_0j + Σ_i α_i (x_i − μ_i) v_ij ),   i.e.  w_ij = α_i β_j v_ij,
                                                         b_j  = β_j v_0j − Σ_i μ_i w_ij,

and plain SG ran on ``v``. Written back on ``(w, b)``, one SG step on ``v`` is the step
``w ← w − η δw``, ``b ← b − η δb`` with (``g_j = ∂E/∂y_j``, ``⟨·⟩`` the minibatch average)

    δw_ij = ⟨β_j² g_j α_i² (x_i − μ_i)⟩ = β_j² α_i² (∂E/∂w_ij − μ_i ∂E/∂b_j)
    δb_j  = ⟨β_j² g_j⟩ − Σ_i μ_i δw_ij   = β_j² ∂E/∂b_j − Σ_i μ_i δw_ij

**Form (b), the one implemented here.** The network stores ``w`` and ``b`` and its forward pass
is unchanged; :meth:`WhitenedLayers.transform_gradients` rewrites ``.grad`` of every weight and
bias in place with the right-hand sides above just before ``optimizer.step()``. The cost is a
few elementwise passes over the weights (proportional to the number of weights, no extra pass
over activations), and because ``(w, b)`` are the stored parameters, changing ``μ``, ``α`` never
changes the network's function. (Form (a), the literal layer storing ``v``, is written in
``tests/test_whitening.py`` to check this one; with it, moving ``μ, α, β`` to ``μ', α', β'``
without touching ``v`` changes the function, and keeping it requires ``v'_ij = v_ij α_i β_j /
(α'_i β'_j)``, ``v'_0j = (b_j + Σ_i μ'_i w_ij) / β'_j``.)

For a Conv2d, ``i = (c, u, v)`` runs over input channel and kernel offset, ``μ_c`` and ``α_c`` are
per input channel, and both gradients are already summed over output positions; this is exact
for the reparametrization applied to the zero-padded input (padding zeros enter as ``x = 0``).
For a grouped conv, unit ``j`` only reads the channels of its group. A layer without bias
(or with a frozen bias) cannot absorb the centering, so it is whitened with ``μ = 0`` (scaling
``δw_ij = β_j² α_i² ∂E/∂w_ij`` only); its ``rescale_mean`` is still tracked.

**The constants.** ``μ_i = E[x_i]`` and ``α_i = 1/sqrt(Var[x_i] + ε)`` are running estimates over
training minibatches of each layer's *input* (per input feature for Linear, per input channel
for Conv2d, pooled over batch and positions). ``β_j² = 1/sqrt(share × fanin)`` (so ``β_j =
(share × fanin)^(−1/4)``), one scalar per layer, with share and fanin from
:func:`rescalelab.geometry.layer_geometry` on the real input size (computed once per fit and
handed to :meth:`Whitening.prepare`).

**Statistics schedule.** A forward *pre*-hook on each layer accumulates, in float32 and without
gradient, ``n``, ``S1 = Σ (x − c)``, ``S2 = Σ (x − c)²`` (shifted by the current ``μ`` against
cancellation; no ``.item()``). Hooks stay registered and are gated by a flag that
``on_train_batch_start`` raises only on update steps: the first ``init_batches`` steps, then
every ``interval``-th step. On an update step, before the gradient transform, the batch mean
``m`` and unbiased batch variance ``s²`` update the running estimates with torch BatchNorm's
rule, ``μ ← (1 − ρ) μ + ρ m``, ``Var ← (1 − ρ) Var + ρ s²`` (``ρ = momentum``, the weight of the
new batch). During the first ``init_batches`` updates ``ρ = 1/k`` for the ``k``-th, i.e. the
estimates start as the plain average of the first batches instead of ``0`` and ``1``. Under
``torch.distributed`` the per-layer ``[n, S1, S2]`` of all layers are packed into one tensor and
all-reduced once per update step, so every replica holds identical ``μ, α``. The trade-off of
``interval`` is lag against cost: the estimates average over about ``interval/ρ`` steps.

**Knobs for α** (all off by default, which is the method as the lecture defines it; they study
its revived-unit instability: an input ``x_i`` that is dead — a ReLU output that is 0 on every
sample — has ``Var_i ≈ 0``, so ``β²α_i² ≈ β²/ε``, and when it revives its weights take a huge
step; docs/whitening.md, "Knobs for α"):

* ``eps_mode=relative``: ``ε = eps × (1/n_in) Σ_i Var_i``, the layer's mean input variance
  (``eps`` itself when that mean is 0), so ``α_i² ≤ 1/ε`` is ``1/eps`` times the layer's
  typical ``α²`` instead of an absolute ``1/eps``.
* ``max_scale=c``: the per-column scale is clipped to ``β²α_i² ≤ c × median_i(β²α_i²)`` (the
  median over the layer's ``n_in`` inputs, torch's lower median for even ``n_in``).
* ``min_active=f``: an input that is nonzero in fewer than a fraction ``f`` of its entries
  (samples × positions) in an update's batch keeps its previous ``μ_i`` and ``Var_i`` (the
  initial ``0`` and ``1`` if it was never active) instead of moving towards ``Var_i ≈ 0``.
  This one adds a count of nonzeros to the statistics hook; the other two act only when the
  per-column scale is recomputed after a statistics update (once per update, no host sync).

**Buffers** (on every whitened layer, so they go into checkpoints and DDP broadcasts):
``rescale_mean`` (μ, ``[n_in]``), ``rescale_var`` (Var, ``[n_in]``; ``α = 1/sqrt(Var + ε)``),
``rescale_beta2`` (scalar ``β²``) and ``rescale_updates`` (number of statistics updates).

**With other optimizers.** The transform acts on ``.grad`` before ``optimizer.step()`` (and before
Lightning's gradient clipping, which then clips the transformed gradient):

* SGD with (Nesterov) momentum accumulates the transformed gradients, so it is exactly
  momentum SG on ``v`` while ``μ, α`` stay constant; when they move, the velocity already
  accumulated is not re-expressed in the new coordinates.
* Coupled weight decay (``weight_decay`` of SGD/Adam) is added by the optimizer *after* the
  transform, i.e. it decays ``w`` (not ``v``) with the unscaled coefficient.
* Adam/RMSProp divide each coordinate by the root of a running average of its own squared
  (transformed) gradient, which cancels any constant per-coordinate factor: the diagonal
  ``β_j² α_i²`` is undone (up to ε, which effectively becomes ``ε / (β_j² α_i²)``). What remains
  is the centering: the weights are driven by ``⟨g_j (x_i − μ_i)⟩`` and the bias by
  ``⟨g_j⟩ − Σ_i μ_i α_i² ⟨g_j (x_i − μ_i)⟩`` instead of ``⟨g_j x_i⟩`` and ``⟨g_j⟩``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rescalelab.errors import ConfigError, Expect, at_least, checked, one_of
from rescalelab.geometry import LayerGeometry, rescalable_layers
from rescalelab.norm.plug import EPS, MOMENTUM, NormPlug

if TYPE_CHECKING:
    import pytorch_lightning as pl

BUFFERS = ("rescale_mean", "rescale_var", "rescale_beta2", "rescale_updates")

# The whitening keys, declared on :class:`Whitening` and on ``BnWarmup`` (its whitened phase).
WHITENING = {
    "momentum": MOMENTUM,
    "interval": at_least(1),
    "eps": EPS,
    "init_batches": at_least(1),
    "eps_mode": one_of("absolute", "relative"),
    "max_scale": Expect(float, lambda v: v >= 1, "null or a number >= 1"),  # c
    "min_active": Expect(float, lambda v: 0 < v <= 1, "null or a fraction in (0, 1]"),  # f
}


@dataclass(eq=False)
class _Layer:
    """Per-layer bookkeeping that is not state of the model (accumulators and caches)."""

    name: str
    module: nn.Conv2d | nn.Linear
    n_in: int
    acc: Tensor | None = None  # [2|3, n_in] float32: S1, S2 of (x − c) (, #nonzero) since update
    count: int = 0  # n accumulated since the last update (Python, no device sync)
    # (μ per weight column, β²α² per column[, β²]) until the next update (3 on the batched path)
    cache: tuple[Tensor | None, ...] | None = None


class _StatsHook:
    """Forward pre-hook: accumulate S1, S2 of the layer input when armed (a picklable callable)."""

    def __init__(self, owner: WhitenedLayers, index: int) -> None:
        self.owner, self.index = owner, index

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.owner.armed and module.training:
            self.owner.accumulate(self.owner.layers[self.index], args[0])


class WhitenedLayers:
    """Running input statistics and the form-(b) gradient transform for every Conv2d/Linear.

    ``WhitenedLayers(model, geometry, ...)`` registers the buffers (or reuses them when the
    model already has them, e.g. rebuilt for a resume) and one forward pre-hook per layer.
    The owner calls :meth:`arm` before an update step's forward, :meth:`update` after the
    backward, then :meth:`transform_gradients`.
    """

    def __init__(
        self,
        model: nn.Module,
        geometry: dict[str, LayerGeometry],
        momentum: float = 0.1,
        eps: float = 1e-5,
        init_batches: int = 8,
        interval: int = 1,
        eps_mode: str = "absolute",
        max_scale: float | None = None,
        min_active: float | None = None,
    ) -> None:
        self.momentum, self.eps = float(momentum), float(eps)
        self.init_batches, self.interval = int(init_batches), int(interval)
        self.eps_mode = eps_mode
        self.max_scale = None if max_scale is None else float(max_scale)
        self.min_active = None if min_active is None else float(min_active)
        self._rows = 2 if self.min_active is None else 3  # S1, S2 (, number of nonzero entries)
        self.armed = False
        self._updates: int | None = 0
        self.layers: list[_Layer] = []
        self._handles: list[Any] = []
        for name, module in rescalable_layers(model):
            n_in = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
            weight = module.weight
            if not hasattr(module, "rescale_mean"):
                kw = {"device": weight.device, "dtype": torch.float32}
                module.register_buffer("rescale_mean", torch.zeros(n_in, **kw))
                module.register_buffer("rescale_var", torch.ones(n_in, **kw))
                module.register_buffer("rescale_beta2", torch.tensor(1.0, **kw))
                module.register_buffer(
                    "rescale_updates", torch.zeros((), dtype=torch.long, device=weight.device)
                )
            else:
                self._updates = None  # buffers may hold a previous state: read the count lazily
            module.rescale_beta2.fill_(geometry[name].scale)
            layer = _Layer(name, module, n_in)
            self.layers.append(layer)
            self._handles.append(
                module.register_forward_pre_hook(_StatsHook(self, len(self.layers) - 1))
            )
        if not self.layers:
            raise ConfigError(
                "norm=whitening is invalid for this model: it has no Conv2d/Linear layer"
            )

    # -- schedule ---------------------------------------------------------------------------
    @property
    def updates(self) -> int:
        """Statistics updates done so far (read once from the buffers after a restore)."""
        if self._updates is None:
            self._updates = int(max(int(la.module.rescale_updates) for la in self.layers))
        return self._updates

    def due(self, step: int) -> bool:
        """Whether ``step`` updates the statistics: the first ``init_batches``, then every ``interval``."""
        return self.updates < self.init_batches or step % self.interval == 0

    def arm(self) -> None:
        """Let the pre-hooks accumulate the inputs of the next training forward(s)."""
        self.armed = True

    def invalidate(self) -> None:
        """Forget caches and the update count (after buffers were loaded from a checkpoint)."""
        self._updates = None
        for layer in self.layers:
            layer.cache, layer.acc, layer.count = None, None, 0
        self.armed = False

    def remove(self) -> None:
        """Unregister the hooks (the buffers stay on the model)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- statistics ---------------------------------------------------------------------------
    @torch.no_grad()
    def accumulate(self, layer: _Layer, x: Tensor) -> None:
        """Add ``n``, ``Σ(x − μ)``, ``Σ(x − μ)²`` of one input batch to the layer's accumulator.

        On CUDA, one fused reduction over the input: ``torch.var_mean`` gives the batch mean
        ``m`` and biased variance ``v``, and ``Σ(x − c) = n (m − c)``, ``Σ(x − c)² = n (v +
        (m − c)²)`` (no input-sized temporary, no host sync). On a CPU, shifted sums over one
        temporary ``x − c``: there torch's ``var_mean`` over the batch (and position) dimensions
        is several times slower than the subtraction and two sums (measured on small_cnn, AlexNet
        inputs, one thread).
        """
        c = layer.module.rescale_mean  # float32 (the statistics' dtype) unless converted
        x = x.detach()
        if x.dtype != c.dtype:
            x = x.to(c.dtype)
        if isinstance(layer.module, nn.Conv2d):
            if x.dim() == 3:  # unbatched input
                x = x.unsqueeze(0)
            dims: tuple[int, ...] = (0, 2, 3)
            n = x.shape[0] * x.shape[2] * x.shape[3]
        else:
            dims = tuple(range(x.dim() - 1))
            n = x.numel() // x.shape[-1]
        if x.is_cuda:
            var, mean = torch.var_mean(x, dims, correction=0)
            d = mean.sub_(c)
            moments = [d, torch.addcmul(var, d, d)]  # E[x − c], E[(x − c)²]
            if self.min_active is not None:  # min_active also counts the active entries
                moments.append(torch.count_nonzero(x, dim=dims).to(d.dtype).div_(n))
            sums = torch.stack(moments).mul_(n)
        else:
            d = x - (c.view(1, -1, 1, 1) if isinstance(layer.module, nn.Conv2d) else c)
            if self.min_active is None:
                sums = torch.stack((d.sum(dims), d.square_().sum(dims)))
            else:
                active = torch.count_nonzero(x, dim=dims).to(d.dtype)
                sums = torch.stack((d.sum(dims), d.square_().sum(dims), active))
        # The first input since the last update starts the sums (no zeroing pass, no indexing).
        layer.acc = sums if layer.count == 0 or layer.acc is None else layer.acc.add_(sums)
        layer.count += n

    @torch.no_grad()
    def update(self) -> None:
        """Fold the accumulated batch statistics into the running ``μ``, ``Var`` and disarm."""
        if not self.armed:
            return
        self.armed = False
        k = self.updates
        rate = 1.0 / (k + 1) if k < self.init_batches else self.momentum
        live = [(la, n, acc) for la, (n, acc) in zip(self.layers, self._reduce()) if n]
        if live:  # one fused (foreach) op per line for all layers: update cost ~ n_layers
            moments = torch._foreach_div([acc for _, _, acc in live], [n for _, n, _ in live])
            m0, m1 = [m[0] for m in moments], [m[1] for m in moments]  # E[x − c], E[(x − c)²]
            var_b = torch._foreach_mul(m0, m0)
            torch._foreach_sub_(var_b, m1)  # −(biased batch variance)
            torch._foreach_mul_(var_b, [-n / max(n - 1.0, 1.0) for _, n, _ in live])  # unbiased
            torch._foreach_clamp_min_(var_b, 0.0)
            mods = [la.module for la, _, _ in live]
            if self.min_active is not None:  # frozen inputs: m = c (μ stays), s² = Var (stays)
                for m, mom, s2 in zip(mods, moments, var_b):
                    frozen = mom[2] < self.min_active
                    mom[0].masked_fill_(frozen, 0.0)
                    s2.copy_(torch.where(frozen, m.rescale_var, s2))
            # μ ← (1 − ρ) μ + ρ m with m = c + E[x − c] and c = μ;  Var ← (1 − ρ) Var + ρ s²
            torch._foreach_add_([m.rescale_mean for m in mods], m0, alpha=rate)
            torch._foreach_lerp_([m.rescale_var for m in mods], var_b, rate)
            torch._foreach_add_([m.rescale_updates for m in mods], 1)
        for layer in self.layers:
            layer.acc, layer.count, layer.cache = None, 0, None
        self._updates = k + 1

    def _reduce(self) -> list[tuple[float, Tensor | None]]:
        """Per layer ``(n, [S1, S2])``, summed over DDP replicas in one collective."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed:
            return [(float(la.count), la.acc) for la in self.layers]
        like = self.layers[0].module.rescale_mean
        parts = []
        for layer in self.layers:
            acc = layer.acc if layer.acc is not None else like.new_zeros(self._rows, layer.n_in)
            parts += [like.new_tensor([float(layer.count)]), acc.reshape(-1).to(like.dtype)]
        packed = torch.cat(parts)
        dist.all_reduce(packed)
        starts, pos = [], 0
        for layer in self.layers:
            starts.append(pos)
            pos += 1 + self._rows * layer.n_in
        counts = packed[starts].tolist()  # one host sync per update step
        r = self._rows
        return [
            (n, packed[p + 1 : p + 1 + r * la.n_in].view(r, la.n_in))
            for la, n, p in zip(self.layers, counts, starts)
        ]

    @torch.no_grad()
    def initialise(self, model: nn.Module, batches: list[Tensor]) -> None:
        """Set ``μ``, ``Var`` from a no-grad pass over ``batches`` (their plain average).

        The model runs in training mode (what the hooks see during training), one update per
        batch with weight ``1/k``, whatever the state of the buffers before.
        """
        was_training = model.training
        model.train()
        self._updates = 0
        for layer in self.layers:
            layer.module.rescale_updates.zero_()
        saved = self.init_batches
        self.init_batches = max(saved, len(batches))
        try:
            for x in batches:
                self.arm()
                model(x)
                self.update()
        finally:
            self.init_batches = saved
            self.armed = False
            model.train(was_training)

    # -- the gradient transform -----------------------------------------------------------------
    @torch.no_grad()
    def input_scale(self, layer: _Layer) -> Tensor:
        """``β²α_i²`` per input ``i`` of ``layer`` as the transform applies it (knobs included)."""
        m = layer.module
        var = m.rescale_var
        eps: Tensor | float = self.eps
        if self.eps_mode == "relative":  # ε = eps × mean_i Var_i (eps itself if that is 0)
            mean = var.mean()
            eps = torch.where(mean > 0, mean, torch.ones_like(mean)) * self.eps
        scale = m.rescale_beta2 / (var + eps)  # β² α²
        if self.max_scale is not None:  # β²α_i² ≤ max_scale × median_i β²α_i²
            scale = torch.minimum(scale, self.max_scale * scale.median())
        return scale

    def _columns(self, layer: _Layer) -> tuple[Tensor | None, Tensor]:
        """``(μ, β²α²)`` expanded to the weight's flattened columns (cached until the next update)."""
        m = layer.module
        cache = layer.cache
        if cache is not None and len(cache) == 2 and cache[1].device == m.weight.device:
            return cache
        centered = m.bias is not None and m.bias.requires_grad
        scale = self.input_scale(layer)  # β² α² (with the knobs for α)
        mu = m.rescale_mean if centered else None
        if isinstance(m, nn.Conv2d):
            taps = m.kernel_size[0] * m.kernel_size[1]
            scale = scale.repeat_interleave(taps)
            mu = mu.repeat_interleave(taps) if mu is not None else None
            if m.groups > 1:  # unit j reads the channels of its group only: one row per unit
                g, per_out = m.groups, m.out_channels // m.groups
                scale = scale.view(g, -1).repeat_interleave(per_out, 0)
                mu = mu.view(g, -1).repeat_interleave(per_out, 0) if mu is not None else None
        dtype = m.weight.dtype
        layer.cache = (mu.to(dtype) if mu is not None else None, scale.to(dtype))
        return layer.cache

    def _fast(self, layer: _Layer) -> bool:
        """Whether ``layer`` takes the batched path of :meth:`transform_gradients`."""
        m = layer.module
        gw = m.weight.grad
        return (
            gw is not None
            and gw.is_contiguous()
            and gw.dtype == m.rescale_var.dtype
            and (isinstance(m, nn.Linear) or m.groups == 1)
        )

    def _plan(self, layers: list[_Layer]) -> list[tuple[Tensor | None, Tensor, Tensor]]:
        """Per fast layer ``(μ per flattened column or None, β²α² shaped to broadcast on the
        weight, β²)``, cached until the next update; one foreach op per line for all layers."""
        todo = [
            la for la in layers
            if la.cache is None or len(la.cache) != 3 or la.cache[1].device != la.module.weight.device
        ]  # fmt: skip
        if todo:
            mods = [la.module for la in todo]
            if self.eps_mode == "absolute" and self.max_scale is None:
                scales = torch._foreach_add([m.rescale_var for m in mods], self.eps)
                torch._foreach_reciprocal_(scales)
                torch._foreach_mul_(scales, [m.rescale_beta2 for m in mods])  # β² α²
            else:
                scales = [self.input_scale(la) for la in todo]
            for la, m, scale in zip(todo, mods, scales):
                centered = m.bias is not None and m.bias.requires_grad
                mu = m.rescale_mean if centered else None
                if isinstance(m, nn.Conv2d):  # column i = (c, u, v): α_c broadcast over taps
                    scale = scale.view(1, -1, 1, 1)
                    if mu is not None:
                        mu = mu.repeat_interleave(m.kernel_size[0] * m.kernel_size[1])
                la.cache = (mu, scale, m.rescale_beta2)
        return [la.cache for la in layers]

    @torch.no_grad()
    def transform_gradients(self) -> None:
        """Replace ``∂E/∂w``, ``∂E/∂b`` by ``δw``, ``δb`` of the reparametrization, in place.

        Per layer, three passes over the weights (the fewest without a fused kernel):
        ``∂E/∂w − μ ∂E/∂bᵀ`` as one rank-1 update (``addr_``, the centering term is never
        materialised), the scale ``× β²α²`` (one ``_foreach_mul_`` for all layers) and the
        bias's ``Σ_i μ_i δw_ij`` (one matrix-vector read, ``addmv_``).
        """
        fast = []
        for layer in self.layers:
            if self._fast(layer):
                fast.append(layer)
            elif layer.module.weight.grad is not None:
                self._transform_one(layer)
        if not fast:
            return
        plan = self._plan(fast)
        flat, biases = [], []
        for la, (mu, _, _) in zip(fast, plan):
            gw, b = la.module.weight.grad, la.module.bias
            g2 = gw.view(gw.shape[0], -1)
            gb = b.grad if mu is not None and b is not None else None
            if gb is not None:
                g2.addr_(gb, mu, alpha=-1.0)  # ∂E/∂w_ij − μ_i ∂E/∂b_j
            flat.append(g2)
            biases.append(gb)
        torch._foreach_mul_([la.module.weight.grad for la in fast], [p[1] for p in plan])  # δw
        with_bias = [(gb, g2, p) for gb, g2, p in zip(biases, flat, plan) if gb is not None]
        if with_bias:
            torch._foreach_mul_([gb for gb, _, _ in with_bias], [p[2] for _, _, p in with_bias])
            for gb, g2, (mu, _, _) in with_bias:
                gb.addmv_(g2, mu, alpha=-1.0)  # β_j² ∂E/∂b_j − Σ_i μ_i δw_ij

    def _transform_one(self, layer: _Layer) -> None:
        """The transform of one layer in the general case (grouped conv, any memory layout)."""
        m = layer.module
        gw = m.weight.grad
        mu, scale = self._columns(layer)
        gb = m.bias.grad if m.bias is not None and mu is not None else None
        g2 = gw.view(gw.shape[0], -1) if gw.is_contiguous() else gw.reshape(gw.shape[0], -1)
        if gb is not None and mu is not None:
            if mu.dim() == 1:
                g2.addr_(gb, mu, alpha=-1.0)  # ∂E/∂w_ij − μ_i ∂E/∂b_j
            else:
                g2.sub_(gb.unsqueeze(1) * mu)
        g2.mul_(scale)  # × β_j² α_i²  → δw
        if gb is not None and mu is not None:
            gb.mul_(m.rescale_beta2.to(gb.dtype))  # β_j² ∂E/∂b_j
            if mu.dim() == 1:
                gb.addmv_(g2, mu, alpha=-1.0)  # − Σ_i μ_i δw_ij
            else:
                gb.sub_((g2 * mu).sum(1))
        if g2.data_ptr() != gw.data_ptr():
            gw.copy_(g2.view_as(gw))


@checked("norm", **WHITENING)
class Whitening(NormPlug):
    """``norm=whitening``: every Conv2d/Linear trained in the whitened parametrization.

    ``momentum`` (ρ, weight of the new batch as in torch BatchNorm), ``interval`` (update the
    statistics every k-th training step), ``eps`` (in ``α = 1/sqrt(Var + ε)``), ``init_batches``
    (first batches averaged to initialise ``μ``, ``Var``); the knobs for α ``eps_mode``
    (``absolute`` | ``relative``), ``max_scale`` and ``min_active`` (``None``: off) are described
    in the module docstring. Nothing is placed after the layers;
    :meth:`prepare` attaches the statistics and the plug transforms gradients before each step.
    The constructor checks the ranges of its keys (:data:`WHITENING`, ``errors.checked``).
    """

    name = "whitening"

    def __init__(
        self,
        momentum: float = 0.1,
        interval: int = 1,
        eps: float = 1e-5,
        init_batches: int = 8,
        eps_mode: str = "absolute",
        max_scale: float | None = None,
        min_active: float | None = None,
    ) -> None:
        self.momentum, self.interval, self.eps = momentum, interval, eps
        self.init_batches = init_batches
        self.eps_mode, self.max_scale, self.min_active = eps_mode, max_scale, min_active
        self.layers: WhitenedLayers | None = None

    def attach(self, model: nn.Module, geometry: dict[str, LayerGeometry]) -> WhitenedLayers:
        """Register the buffers and hooks on ``model`` (β² from the share and fanin in ``geometry``)."""
        if not rescalable_layers(model):
            raise ConfigError(
                f"norm={self.name} is invalid for this model: it has no Conv2d/Linear layer"
            )
        if self.layers is not None:
            self.layers.remove()
        self.layers = WhitenedLayers(
            model, geometry, momentum=self.momentum, eps=self.eps,
            init_batches=self.init_batches, interval=self.interval, eps_mode=self.eps_mode,
            max_scale=self.max_scale, min_active=self.min_active,
        )  # fmt: skip
        return self.layers

    def prepare(self, model: nn.Module, geometry: dict[str, LayerGeometry]) -> None:
        self.attach(model, geometry)

    def on_train_batch_start(self, model: nn.Module, batch: Tensor, step: int) -> None:
        if self.layers is not None and self.layers.due(step):
            self.layers.arm()

    def before_optimizer_step(self, model: nn.Module) -> None:
        if self.layers is not None:
            self.layers.update()
            self.layers.transform_gradients()

    def on_load_checkpoint(self, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.layers is not None:
            self.layers.invalidate()
