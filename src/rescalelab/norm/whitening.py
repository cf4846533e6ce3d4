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
Each is a view of one flat tensor holding that quantity for every layer, so that a statistics
update and the per-input scales ``β²α²`` are a few ops for the whole model rather than a few
per layer (on a CPU every op costs its dispatch: on small_cnn the update went from ~310 to
~60 µs); a buffer replaced by ``model.to(...)`` or an assignment is bound again on the next
call, and loading a state dict writes through the views.

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

from dataclasses import dataclass, field
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


def _dims(x: Tensor, conv: bool) -> tuple[int, ...]:
    """The dimensions a layer input is pooled over: batch and positions (conv), all but the last."""
    return (0, 2, 3) if conv else tuple(range(x.dim() - 1))


def fused_sums(x: Tensor, c: Tensor, conv: bool, active: bool) -> Tensor:
    """``[Σ(x − c), Σ(x − c)² (, number of nonzero entries)]`` per input from one fused
    reduction (the CUDA path): ``torch.var_mean`` gives the batch mean ``m`` and biased variance
    ``v``, and ``Σ(x − c) = n (m − c)``, ``Σ(x − c)² = n (v + (m − c)²)``; no input-sized
    temporary, no host sync. ``x``: a batched conv input ``[N, C, H, W]`` (``conv``) or a Linear
    input ``[..., n_in]``; ``c``: the shift (the current ``μ``), per input."""
    dims = _dims(x, conv)
    n = x.numel() // c.numel()  # samples (× positions) per input
    var, mean = torch.var_mean(x, dims, correction=0)
    d = mean.sub_(c)
    moments = [d, torch.addcmul(var, d, d)]  # E[x − c], E[(x − c)²]
    if active:
        moments.append(torch.count_nonzero(x, dim=dims).to(d.dtype).div_(n))
    return torch.stack(moments).mul_(n)


def shifted_sums(x: Tensor, c: Tensor, conv: bool, active: bool) -> Tensor:
    """The same sums as :func:`fused_sums` from one temporary ``d = x − c`` (the CPU path: there
    torch's ``var_mean`` over the batch and position dimensions is several times slower than
    the subtraction and two sums). A conv input's ``d`` viewed ``[N, C, H·W]`` is summed over
    its contiguous last dimension first (``Σ d`` and ``‖d‖²`` per row), then over the batch:
    1.3–3.6× faster than reducing ``(0, 2, 3)`` at once on small_cnn's and AlexNet's inputs."""
    dims = _dims(x, conv)
    d = x - (c.view(1, -1, 1, 1) if conv else c)
    parts = [torch.count_nonzero(x, dim=dims).to(d.dtype)] if active else []
    if conv and d.is_contiguous():
        rows = d.view(d.shape[0], d.shape[1], -1)  # [N, C, H·W]
        s1 = rows.sum(2).sum(0)
        s2 = torch.linalg.vector_norm(rows, dim=2).square_().sum(0)
    else:
        s1, s2 = d.sum(dims), d.square_().sum(dims)
    return torch.stack((s1, s2, *parts))


def transform_dense(
    gw: Tensor, gb: Tensor | None, scale: Tensor, mu: Tensor | None, beta2: Tensor | float
) -> None:
    """``∂E/∂w``, ``∂E/∂b`` → ``δw``, ``δb`` in place for one contiguous, ungrouped layer.

    ``gw``: ``[n_out, n_in]`` or ``[n_out, n_in, u, v]``; ``scale``: ``β²α_i²`` per input;
    ``mu``: ``μ`` per weight column (``n_in × taps``), with ``gb`` ``None`` when the layer does
    not centre. Three passes over the weights: the rank-1 update ``∂E/∂w − μ ∂E/∂bᵀ`` (``addr_``,
    never materialised), ``× β²α²``, and the matrix-vector read of ``δb = β² ∂E/∂b − Σ_i μ_i
    δw_ij`` (``addmv_``). ``beta2`` is a number on a CPU and a tensor on a GPU (no host sync).
    """
    g2 = gw.view(gw.shape[0], -1)
    if gb is not None:
        g2.addr_(gb, mu, alpha=-1.0)  # ∂E/∂w_ij − μ_i ∂E/∂b_j
    gw.mul_(scale.view(1, -1, 1, 1) if gw.dim() == 4 else scale)  # × β_j² α_i²  → δw
    if gb is None:
        return
    if isinstance(beta2, Tensor):
        gb.mul_(beta2).addmv_(g2, mu, alpha=-1.0)  # β_j² ∂E/∂b_j − Σ_i μ_i δw_ij
    else:
        gb.addmv_(g2, mu, beta=beta2, alpha=-1.0)


@dataclass(eq=False)
class _Layer:
    """Per-layer bookkeeping that is not state of the model."""

    name: str
    module: nn.Conv2d | nn.Linear
    n_in: int
    start: int  # offset of its inputs i in the flat statistics (μ, Var, S1, S2)
    columns: slice  # its weight columns (i, or (c, u, v) of a conv) in the flat plan's μ
    count: int = 0  # n accumulated since the last update (Python, no device sync)


@dataclass(eq=False)
class _Flat:
    """All layers' ``μ`` and ``Var`` as one tensor each, the layers' buffers being views of it.

    One op then updates every layer's statistics, and one op gives every layer's ``β²α²``: on a
    CPU each torch op costs its dispatch whatever its size (and a ``_foreach`` op is a loop of
    them there), so the cost of an update step no longer grows with the number of layers.
    """

    mean: Tensor  # [T] μ of every layer's inputs, T = Σ n_in
    var: Tensor  # [T] Var
    updates: Tensor  # [L] long: rescale_updates of every layer
    beta2: Tensor  # [L] β² of every layer
    ptrs: list[tuple[int, ...]]  # the views' data pointers: a replaced buffer is seen
    layer_of: Tensor  # [T] long: the layer of each input (β² per input = beta2[layer_of])
    input_of: Tensor  # [Σ n_in × taps] long: the input of each weight column
    acc: Tensor | None = None  # [2|3, T]: S1, S2 of (x − c) (, #nonzero) since the last update
    # (counts, rate) -> per input [n, n/(n−1), ρ (0 where a layer saw nothing)]; few keys
    weights: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = field(default_factory=dict)
    # until the next update: (β²α² [T], μ per weight column [Σ n_in × taps], β² per layer as
    # numbers on a CPU (None on a GPU: no host sync))
    plan: tuple[Tensor, Tensor, list[float] | None] | None = None


class _StatsHook:
    """Forward pre-hook: accumulate S1, S2 of the layer input when armed (a picklable callable)."""

    def __init__(self, owner: WhitenedLayers, index: int) -> None:
        self.owner, self.index = owner, index

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.owner.armed and module.training:
            self.owner.accumulate(self.owner.layers[self.index], args[0])


class WhitenedLayers:
    """Running input statistics and the form-(b) gradient transform for every Conv2d/Linear.

    ``WhitenedLayers(model, geometry, ...)`` registers the buffers (or reuses their values when
    the model already has them, e.g. rebuilt for a resume) and one forward pre-hook per layer.
    The owner calls :meth:`arm` before an update step's forward, :meth:`update` after the
    backward, then :meth:`transform_gradients`.

    Every layer's ``rescale_mean``, ``rescale_var`` and ``rescale_updates`` are views of one
    flat tensor each (:class:`_Flat`), so that an update step is a handful of ops for the whole
    model. They stay ordinary buffers (state dict, checkpoints, DDP broadcasts write them in
    place); when something replaces them (``model.to(...)``, a dtype change, an assignment),
    the next call sees it and binds the new buffers' values into a new flat tensor.
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
        self._flat: _Flat | None = None
        start = column = 0
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
            taps = (
                module.kernel_size[0] * module.kernel_size[1]
                if isinstance(module, nn.Conv2d)
                else 1
            )
            self.layers.append(
                _Layer(name, module, n_in, start, slice(column, column + n_in * taps))
            )
            start, column = start + n_in, column + n_in * taps
            self._handles.append(
                module.register_forward_pre_hook(_StatsHook(self, len(self.layers) - 1))
            )
        if not self.layers:
            raise ConfigError(
                "norm=whitening is invalid for this model: it has no Conv2d/Linear layer"
            )
        self._bind()

    # -- the flat statistics ----------------------------------------------------------------------
    def _views(self) -> list[tuple[int, ...]]:
        return [
            (
                m.rescale_mean.data_ptr(), m.rescale_var.data_ptr(),
                m.rescale_updates.data_ptr(), m.rescale_beta2.data_ptr(),
            )
            for m in (la.module for la in self.layers)
        ]  # fmt: skip

    def _bind(self) -> _Flat:
        """The flat statistics, (re)built from the layers' buffers when they are not its views."""
        flat = self._flat
        if flat is not None and flat.ptrs == self._views():
            return flat
        mods = [la.module for la in self.layers]
        mean = torch.cat([m.rescale_mean.reshape(-1) for m in mods])
        var = torch.cat([m.rescale_var.reshape(-1).to(mean) for m in mods])
        updates = torch.stack([m.rescale_updates.reshape(()).to(mean.device) for m in mods])
        beta2 = torch.stack([m.rescale_beta2.reshape(()).to(mean) for m in mods])
        for k, (la, m) in enumerate(zip(self.layers, mods)):
            cols = slice(la.start, la.start + la.n_in)
            m.register_buffer("rescale_mean", mean[cols])
            m.register_buffer("rescale_var", var[cols])
            m.register_buffer("rescale_updates", updates[k])
            m.register_buffer("rescale_beta2", beta2[k])
        # Gathers with fixed indices: repeat_interleave with a tensor of repeats costs several
        # times an index_select of the same size on a CPU.
        sizes = torch.tensor([la.n_in for la in self.layers])
        taps = [la.columns.stop - la.columns.start for la in self.layers]
        input_of = torch.arange(len(mean)).repeat_interleave(
            torch.tensor(taps).div(sizes, rounding_mode="floor").repeat_interleave(sizes)
        )
        self._flat = flat = _Flat(
            mean, var, updates, beta2, self._views(),
            layer_of=torch.arange(len(mods)).repeat_interleave(sizes).to(mean.device),
            input_of=input_of.to(mean.device),
        )  # fmt: skip
        return flat

    def _weights(self, flat: _Flat, counts: list[float], rate: float) -> tuple[Tensor, Tensor]:
        """Per input ``[n, n/(n − 1), ρ]`` of its layer (``ρ = 0`` where a layer saw nothing),
        and per layer 1 where it saw inputs; cached (built on the host, moved once per key)."""
        key = (*counts, rate)
        w = flat.weights.get(key)
        if w is None:
            if len(flat.weights) > 16:  # the first init_batches rates, then one key
                flat.weights.clear()
            per_layer = torch.tensor(
                [[max(n, 1.0), n / max(n - 1.0, 1.0), rate if n else 0.0] for n in counts],
                dtype=flat.mean.dtype,
            ).T
            sizes = torch.tensor([la.n_in for la in self.layers])
            live = torch.tensor([1 if n else 0 for n in counts])
            w = flat.weights[key] = (
                per_layer.repeat_interleave(sizes, dim=1).to(flat.mean.device),
                live.to(flat.updates.device),
            )
        return w

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
        self._bind()
        self.armed = True

    def invalidate(self) -> None:
        """Forget caches and the update count (after buffers were loaded from a checkpoint)."""
        self._updates = None
        for layer in self.layers:
            layer.count = 0
        self._flat = None  # the views are bound again to the (loaded) buffers
        self.armed = False

    def remove(self) -> None:
        """Unregister the hooks (the buffers stay on the model)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- statistics ---------------------------------------------------------------------------
    @torch.no_grad()
    def accumulate(self, layer: _Layer, x: Tensor) -> None:
        """Add ``n``, ``Σ(x − μ)``, ``Σ(x − μ)²`` of one input batch to the layer's accumulator:
        on CUDA from one fused reduction (:func:`fused_sums`), on a CPU from one shifted
        temporary (:func:`shifted_sums`); no host sync."""
        flat = self._flat
        if flat is None:
            flat = self._bind()
        c = layer.module.rescale_mean  # float32 (the statistics' dtype) unless converted
        x = x.detach()
        if x.dtype != c.dtype:
            x = x.to(c.dtype)
        conv = isinstance(layer.module, nn.Conv2d)
        if conv and x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        sums = (fused_sums if x.is_cuda else shifted_sums)(x, c, conv, self.min_active is not None)
        n = x.numel() // layer.n_in  # samples (× positions) per input
        if flat.acc is None:  # the first input since the last update: zero every layer's sums
            flat.acc = sums.new_zeros(self._rows, flat.mean.numel())
        flat.acc[:, layer.start : layer.start + layer.n_in].add_(sums)
        layer.count += n

    @torch.no_grad()
    def update(self) -> None:
        """Fold the accumulated batch statistics into the running ``μ``, ``Var`` and disarm.

        For all layers at once, on the flat statistics (a handful of ops, whatever the number of
        layers): with ``n`` per input the count of its layer, ``m = c + S1/n`` and ``s² = n/(n − 1)
        (S2/n − (S1/n)²)``, then ``μ ← μ + ρ (m − c)`` and ``Var ← Var + ρ (s² − Var)``.
        """
        if not self.armed:
            return
        self.armed = False
        flat = self._flat or self._bind()  # bound by arm(), at the start of this step
        k = self.updates
        rate = 1.0 / (k + 1) if k < self.init_batches else self.momentum
        counts, acc = self._reduce(flat)
        if acc is not None and any(counts):
            (n, correction, weight), live = self._weights(flat, counts, rate)
            moments = acc / n  # E[x − c], E[(x − c)²] (, active fraction) per input
            m0 = moments[0]
            s2 = torch.addcmul(moments[1], m0, m0, value=-1.0)  # biased batch variance
            s2.mul_(correction).clamp_min_(0.0)  # unbiased
            if self.min_active is not None:  # frozen inputs: m = c (μ stays), s² = Var (stays)
                frozen = moments[2] < self.min_active
                m0.masked_fill_(frozen, 0.0)
                s2 = torch.where(frozen, flat.var, s2)
            # μ ← (1 − ρ) μ + ρ m with m = c + E[x − c] and c = μ;  Var ← (1 − ρ) Var + ρ s²
            flat.mean.addcmul_(m0, weight)
            flat.var.lerp_(s2, weight)
            flat.updates.add_(live)
        for layer in self.layers:
            layer.count = 0
        flat.acc, flat.plan = None, None
        self._updates = k + 1

    def _reduce(self, flat: _Flat) -> tuple[list[float], Tensor | None]:
        """Per layer ``n`` and the flat ``[S1, S2]``, summed over DDP replicas in one collective."""
        counts = [float(la.count) for la in self.layers]
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed:
            return counts, flat.acc
        acc = (
            flat.acc if flat.acc is not None else flat.mean.new_zeros(self._rows, flat.mean.numel())
        )
        packed = torch.cat([flat.mean.new_tensor(counts), acc.reshape(-1).to(flat.mean.dtype)])
        dist.all_reduce(packed)
        total = packed[: len(counts)].tolist()  # one host sync per update step
        return total, packed[len(counts) :].view_as(acc)

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

    def _plan(self, flat: _Flat) -> tuple[Tensor, Tensor, list[float] | None]:
        """``(β²α² per input, μ per weight column, β² per layer)`` of every layer, flat (until
        the next update): four ops for all layers with the lecture's α, one more for the conv
        columns' ``μ``."""
        if flat.plan is None:
            if self.eps_mode == "absolute" and self.max_scale is None:
                scale = (flat.var + self.eps).reciprocal_()
                scale.mul_(flat.beta2.index_select(0, flat.layer_of))  # β² α²
            else:
                scale = torch.cat([self.input_scale(la).to(flat.var) for la in self.layers])
            # column (c, u, v) of a conv weight: μ_c repeated over its kernel taps
            numbers = None if flat.beta2.is_cuda else flat.beta2.tolist()
            flat.plan = (scale, flat.mean.index_select(0, flat.input_of), numbers)
        return flat.plan

    @torch.no_grad()
    def transform_gradients(self) -> None:
        """Replace ``∂E/∂w``, ``∂E/∂b`` by ``δw``, ``δb`` of the reparametrization, in place.

        Per layer, three passes over the weights (the fewest without a fused kernel;
        :func:`transform_dense`, or :meth:`_transform_one` for a grouped conv, another layout or
        dtype): ``∂E/∂w − μ ∂E/∂bᵀ`` as one rank-1 update, the scale ``× β²α²`` and the bias's
        ``β² ∂E/∂b − Σ_i μ_i δw_ij`` (one matrix-vector read). ``β²α²`` and the columns' ``μ``
        come from the flat plan, sliced per layer (views, no copy).
        """
        flat = self._bind()
        scale, mu_cols, numbers = self._plan(flat)
        for k, la in enumerate(self.layers):
            m = la.module
            gw = m.weight.grad
            if gw is None:
                continue
            s = scale[la.start : la.start + la.n_in]
            b = m.bias
            mu = mu_cols[la.columns] if b is not None and b.requires_grad else None
            gb = b.grad if mu is not None and b is not None else None
            beta2: Tensor | float = flat.beta2[k] if numbers is None else numbers[k]
            if gw.is_contiguous() and gw.dtype == s.dtype and getattr(m, "groups", 1) == 1:
                transform_dense(gw, gb, s, mu, beta2)
            else:
                self._transform_one(la, s, mu, beta2)

    def _transform_one(
        self, layer: _Layer, scale: Tensor, mu: Tensor | None, beta2: Tensor | float
    ) -> None:
        """The transform of one layer in the general case (grouped conv, any memory layout or
        dtype): ``scale`` per input, ``mu`` per weight column (``None``: no centering)."""
        m = layer.module
        gw = m.weight.grad
        dtype = gw.dtype
        scale = scale.to(dtype)
        mu = mu.to(dtype) if mu is not None else None
        if isinstance(m, nn.Conv2d):
            scale = scale.repeat_interleave(m.kernel_size[0] * m.kernel_size[1])
            if m.groups > 1:  # unit j reads the channels of its group only: one row per unit
                g, per_out = m.groups, m.out_channels // m.groups
                scale = scale.view(g, -1).repeat_interleave(per_out, 0)
                mu = mu.view(g, -1).repeat_interleave(per_out, 0) if mu is not None else None
        gb = m.bias.grad if m.bias is not None and mu is not None else None
        g2 = gw.view(gw.shape[0], -1) if gw.is_contiguous() else gw.reshape(gw.shape[0], -1)
        if gb is not None and mu is not None:
            if mu.dim() == 1:
                g2.addr_(gb, mu, alpha=-1.0)  # ∂E/∂w_ij − μ_i ∂E/∂b_j
            else:
                g2.sub_(gb.unsqueeze(1) * mu)
        g2.mul_(scale)  # × β_j² α_i²  → δw
        if gb is not None and mu is not None:
            gb.mul_(beta2.to(gb.dtype) if isinstance(beta2, Tensor) else beta2)  # β_j² ∂E/∂b_j
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
