"""``optim=soap`` and ``optim=muon``: heavyball's SOAP and Muon (+ AdamW) optimizers.

* **SOAP** (Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam") is Adam run
  in the eigenbasis of Shampoo's Kronecker-factored preconditioner: for a weight matrix with
  gradient ``G`` (a conv weight is merged to ``out × (in·k·k)``), ``L ← β₂' L + (1 − β₂') G Gᵀ``,
  ``R ← β₂' R + (1 − β₂') Gᵀ G`` (``shampoo_beta``), their eigenvectors ``Q_L``, ``Q_R``
  refreshed every ``precondition_frequency`` steps, and Adam's moments kept on
  ``G' = Q_Lᵀ G Q_R``, the update rotated back. It is the Kronecker-factored relative of
  diagonal rescaling: whitening's ``β_j² α_i²`` is a diagonal ``L ⊗ R`` with the input
  statistics for ``R``. Dimensions above ``max_precond_dim`` and 1-D parameters get Adam's
  diagonal.
* **Muon** (Jordan et al., 2024) keeps a Nesterov momentum ``M`` of each matrix-shaped
  parameter's gradient and steps along its orthogonalization ``U Vᵀ`` (``M = U Σ Vᵀ``, from five
  Newton–Schulz iterations), scaled by ``sqrt(max(1, rows/cols))``. Following heavyball's recipe
  (``heavyball.MuonAdamW``), parameters with two or more dimensions (conv weights flattened to
  ``out × (in·k·k)``, Linear weights) go through Muon and the others (biases, normalization
  gains and shifts) through AdamW, with the same stepsize.

heavyball compiles its update functions with ``torch.compile`` by default; on a CPU the first
step then takes minutes. ``compile: false`` (the default here) runs each ``step`` under
``torch.compiler.set_stance("force_eager")``: the same arithmetic, eagerly. ``compile: true``
keeps heavyball's compiled path (worth it for long GPU runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import heavyball
import torch


class _EagerStep:
    """Run the library's ``step`` eagerly unless ``torch_compile`` is set."""

    torch_compile: bool = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.torch_compile:
            return super().step(closure)  # type: ignore[misc]
        with torch.compiler.set_stance("force_eager"):
            return super().step(closure)  # type: ignore[misc]


class SOAP(_EagerStep, heavyball.SOAP):
    """heavyball's ``SOAP`` with its defaults; ``compile`` as described in the module."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        betas: Sequence[float] = (0.9, 0.95),
        shampoo_beta: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 2,
        max_precond_dim: int = 2048,
        compile: bool = False,
    ) -> None:
        self.torch_compile = bool(compile)
        super().__init__(
            params, lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps,
            weight_decay=weight_decay, precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
        )  # fmt: skip


class Muon(_EagerStep, heavyball.MuonAdamW):
    """heavyball's ``MuonAdamW``: Muon on parameters with ≥ 2 dims, AdamW on the others."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0025,
        betas: Sequence[float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        compile: bool = False,
    ) -> None:
        self.torch_compile = bool(compile)
        super().__init__(
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            nesterov=nesterov,
        )  # fmt: skip
