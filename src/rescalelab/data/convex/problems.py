"""Strongly convex synthetic problems with known constants (BCN §4, paper-notes §8).

Two finite-sum objectives over n samples (x_i, y_i), x_i ∈ R^d, with a linear model w ∈ R^d:

* ridge least squares (``data=quadratic``)
      F(w) = (1/2n) Σ (x_iᵀw − y_i)² + (λ/2)‖w‖²,   y_i = x_iᵀw_true + σ ε_i;
* L2-regularised logistic regression (``data=logistic``), y_i ∈ {−1, +1} ~ sigmoid(x_iᵀw_true):
      F(w) = (1/n) Σ log(1 + exp(−y_i x_iᵀw)) + (λ/2)‖w‖².

The inputs are drawn so that their second moment XᵀX/n has *exactly* the spectrum
logspace(0, −log10 cond) (Gaussian rows, whitened, then scaled and rotated), which makes L and c
exact and chosen: for least squares L = 1 + λ and c = 1/cond + λ.

The one-sample gradient g_i(w) = ∇f_i(w) + λw is unbiased, so μ = μ_G = 1 (Assumption 4.3), and
the noise constants of 4.3(c), V[g] ≤ M + M_V‖∇F‖², are (per sample; a minibatch of n_mb drawn
with replacement divides M and M_V by n_mb):

* least squares: M = 2 tr Σ*, Σ* = Cov(g_i(w*)); M_V = 2 λ_max(H⁻¹ E[AᵀA] H⁻¹), A_i = x_ix_iᵀ − XᵀX/n;
* logistic: M = (1/n) Σ‖x_i‖² (since |σ| ≤ 1), M_V = 0;

and M_G = μ_G² + M_V. F* comes from the normal equations (least squares) or from Newton's method
in float64 (logistic; cached on disk, keyed by a hash of the parameters and the data).
:meth:`ConvexProblem.estimate_noise` measures M and M_G by sampling gradients instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
DTYPE = torch.float64


class ConvexProblem:
    """F(w) = (1/n) Σ ℓ(x_iᵀw, y_i) + (λ/2)‖w‖² on float64 data, with its constants.

    Every method accepts one point ``w`` of shape (d,) or a batch ``W`` of shape (R, d) (R
    independent iterates, e.g. one per seed) and returns values of shape () or (R,).
    """

    name = "convex"
    mu = 1.0  # unbiased stochastic gradients: μ = μ_G = 1

    def __init__(self, x: Tensor, y: Tensor, lam: float) -> None:
        self.x, self.y, self.lam = x.to(DTYPE), y.to(DTYPE), float(lam)
        self.n, self.d = self.x.shape
        self.w_star = torch.zeros(self.d, dtype=DTYPE)
        self.F_star = float("nan")
        self.L = self.c = self.M = self.M_V = float("nan")

    # -- the per-sample loss ℓ(z, y) and its derivative in z -----------------------------------
    def loss(self, z: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def dloss(self, z: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    # -- exact F, ∇F and stochastic gradients ----------------------------------------------------
    def objective(self, w: Tensor) -> Tensor:
        """F(w) on the full training set."""
        w = w.to(DTYPE)
        z = w @ self.x.T  # (..., n)
        return self.loss(z, self.y).mean(-1) + 0.5 * self.lam * (w * w).sum(-1)

    def gap(self, w: Tensor) -> Tensor:
        """F(w) − F*."""
        return self.objective(w) - self.F_star

    def gradient(self, w: Tensor) -> Tensor:
        """∇F(w) = (1/n) Σ ℓ'(x_iᵀw, y_i) x_i + λw."""
        w = w.to(DTYPE)
        z = w @ self.x.T
        return self.dloss(z, self.y) @ self.x / self.n + self.lam * w

    def minibatch_gradient(self, w: Tensor, idx: Tensor) -> Tensor:
        """g(w, ξ) = (1/n_mb) Σ_{i ∈ ξ} ∇f_i(w) + λw for index sets ``idx`` of shape (R, n_mb)."""
        w = w.to(DTYPE)
        xb, yb = self.x[idx], self.y[idx]  # (R, b, d), (R, b)
        z = (xb @ w.unsqueeze(-1)).squeeze(-1)
        return (self.dloss(z, yb).unsqueeze(-1) * xb).mean(-2) + self.lam * w

    def sample_gradients(self, w: Tensor, idx: Tensor) -> Tensor:
        """One-sample gradients g_i(w), one row per index in ``idx`` (shape (S,))."""
        return self.minibatch_gradient(w.expand(len(idx), -1), idx.unsqueeze(-1))

    # -- constants ---------------------------------------------------------------------------------
    @property
    def M_G(self) -> float:
        """M_G = μ_G² + M_V (BCN 4.9)."""
        return 1.0 + self.M_V

    def noise_scale(self, batch_size: int, replacement: bool = True) -> float:
        """Factor on (M, M_V) for a minibatch: 1/n_mb with replacement, the finite-population
        factor (n − n_mb)/(n_mb (n − 1)) without (0 for the full batch)."""
        b = min(batch_size, self.n)
        if b >= self.n:
            return 0.0
        return 1.0 / b if replacement else (self.n - b) / (b * (self.n - 1))

    def constants(self, batch_size: int = 1, replacement: bool = True) -> dict[str, float]:
        """L, c, μ, M, M_V, M_G for minibatches of ``batch_size`` and the stepsize limit
        μ/(L M_G) of Theorems 4.6–4.8."""
        s = self.noise_scale(batch_size, replacement)
        M, M_V = self.M * s, self.M_V * s
        M_G = 1.0 + M_V
        return {
            "L": self.L, "c": self.c, "mu": self.mu, "M": M, "M_V": M_V, "M_G": M_G,
            "alpha_max": self.mu / (self.L * M_G), "F_star": self.F_star,
        }  # fmt: skip

    @torch.no_grad()
    def estimate_noise(
        self, points: int = 24, samples: int = 4096, seed: int = 0
    ) -> dict[str, float]:
        """M and M_G of Assumption 4.3 measured by sampling one-sample gradients.

        V̂(w) = mean ‖g_i(w) − ∇F(w)‖² over ``samples`` indices drawn with replacement (the same
        indices at every point), at w* and at ``points`` points w = w* + r u (random unit
        directions u, radii r log-spaced in [0.01, 3]·max(‖w*‖, 1)). As in the least-squares
        constants, Young's inequality splits the noise as M̂ = 2 V̂(w*) (twice the noise at the
        optimum, where ∇F = 0), and M̂_V = max_w (V̂(w) − M̂)₊/‖∇F(w)‖² is the smallest M_V that
        makes V̂(w) ≤ M̂ + M̂_V‖∇F(w)‖² hold at every sampled point; M̂_G = 1 + M̂_V.
        """
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, self.n, (samples,), generator=g)

        def variance(w: Tensor) -> float:
            gs = self.sample_gradients(w, idx)
            return float(((gs - self.gradient(w)) ** 2).sum(-1).mean())

        v_star = variance(self.w_star)
        m_hat = 2.0 * v_star
        scale = max(float(self.w_star.norm()), 1.0)
        mv_hat = 0.0
        for r in torch.logspace(-2, math.log10(3.0), points, dtype=DTYPE):
            u = torch.randn(self.d, generator=g, dtype=DTYPE)
            w = self.w_star + float(r) * scale * u / u.norm()
            grad2 = float((self.gradient(w) ** 2).sum())
            if grad2 > 0:
                mv_hat = max(mv_hat, (variance(w) - m_hat) / grad2)
        return {"V_star_est": v_star, "M_est": m_hat, "M_V_est": mv_hat, "M_G_est": 1.0 + mv_hat}

    @torch.no_grad()
    def mean_square_threshold(self, batch_size: int, replacement: bool = True) -> float:
        """The largest α for which SG on this problem stays bounded in mean square.

        Only for quadratics: e_{k+1} = (I − αĜ_k) e_k − α b_k, so E[e eᵀ] is driven by the linear
        map P ↦ E[(I − αĜ) P (I − αĜ)], whose spectral radius crosses 1 at the threshold
        (2/L for the full batch). Found by bisection; exact for sampling with replacement.
        """
        raise NotImplementedError(f"{self.name}: no mean-square threshold")

    def describe(self) -> dict[str, Any]:
        return {
            "d": self.d, "lam": self.lam, "L": self.L, "c": self.c, "mu": self.mu,
            "F_star": self.F_star, "M": self.M, "M_V": self.M_V, "M_G": self.M_G,
            "alpha_max": self.mu / (self.L * self.M_G),
        }  # fmt: skip


def population(d: int, cond: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(Q, s): a random rotation and the spectrum s = logspace(0, −log10 cond, d)."""
    s = torch.logspace(0, -math.log10(cond), d, dtype=DTYPE)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    return q, s


def draw_inputs(n: int, q: Tensor, s: Tensor, g: torch.Generator, exact: bool) -> Tensor:
    """Rows ~ N(0, Q diag(s) Qᵀ); with ``exact`` they are whitened first, so that
    XᵀX/n = Q diag(s) Qᵀ exactly (needs n >= d)."""
    z = torch.randn(n, len(s), generator=g, dtype=DTYPE)
    if exact:
        evals, evecs = torch.linalg.eigh(z.T @ z / n)
        z = z @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return z @ torch.diag(s.sqrt()) @ q.T


class LeastSquaresProblem(ConvexProblem):
    """Ridge least squares: ℓ(z, y) = ½(z − y)², H = XᵀX/n + λI, L = λ_max(H), c = λ_min(H)."""

    name = "quadratic"

    def __init__(self, x: Tensor, y: Tensor, lam: float) -> None:
        super().__init__(x, y, lam)
        n, d = self.n, self.d
        xtx = self.x.T @ self.x / n
        self.H = xtx + self.lam * torch.eye(d, dtype=DTYPE)
        self.w_star = torch.linalg.solve(self.H, self.x.T @ self.y / n)
        self.F_star = float(self.objective(self.w_star))
        evals = torch.linalg.eigvalsh(self.H)
        self.L, self.c = float(evals[-1]), float(evals[0])
        b = self.sample_gradients(self.w_star, torch.arange(n))  # g_i(w*) = b_i, mean 0
        self.tr_sigma = float((b * b).sum(-1).mean())
        sq = (self.x * self.x).sum(-1)
        eata = (self.x.T * sq) @ self.x / n - xtx @ xtx  # E[AᵀA]
        h_inv = torch.linalg.inv(self.H)
        self.M = 2.0 * self.tr_sigma
        self.M_V = 2.0 * float(torch.linalg.eigvalsh(h_inv @ eata @ h_inv)[-1])

    def loss(self, z: Tensor, y: Tensor) -> Tensor:
        return 0.5 * (z - y) ** 2

    def dloss(self, z: Tensor, y: Tensor) -> Tensor:
        return z - y

    def plateau(self, alpha: float, batch_size: int = 1) -> float:
        """Small-α stationary gap E[F − F*] ≈ (α/4) tr Σ*/n_mb (paper-notes §8)."""
        return 0.25 * alpha * self.tr_sigma * self.noise_scale(batch_size)

    @torch.no_grad()
    def mean_square_threshold(self, batch_size: int, replacement: bool = True) -> float:
        d, n = self.d, self.n
        if d > 40:
            raise ValueError(f"mean_square_threshold needs d <= 40 (d^2 x d^2 matrices), got {d}")
        eye = torch.eye(d, dtype=DTYPE)
        hh = torch.kron(self.H, self.H)
        s = self.noise_scale(batch_size, replacement)
        if s > 0:
            # E[G_i ⊗ G_i] with G_i = x_ix_iᵀ + λI, minus H ⊗ H: the covariance of one sample.
            outer = (self.x.unsqueeze(2) * self.x.unsqueeze(1)).reshape(n, d * d)
            gg = outer.T @ outer / n
            xtx = self.H - self.lam * eye
            gg = (
                gg
                + self.lam * (torch.kron(xtx, eye) + torch.kron(eye, xtx))
                + self.lam**2 * torch.eye(d * d, dtype=DTYPE)
            )
            second = hh + s * (gg - hh)
        else:
            second = hh
        first = torch.kron(self.H, eye) + torch.kron(eye, self.H)
        ident = torch.eye(d * d, dtype=DTYPE)

        def radius(alpha: float) -> float:
            t = ident - alpha * first + alpha**2 * second
            return float(torch.linalg.eigvalsh(0.5 * (t + t.T)).abs().max())

        lo, hi = 0.0, 2.0 / self.L
        if s == 0:
            return hi  # gradient descent: (I − αH) contracts iff α < 2/L
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if radius(mid) < 1.0 else (lo, mid)
        return lo


class LogisticProblem(ConvexProblem):
    """Ridge logistic regression: ℓ(z, y) = log(1 + e^{−yz}), y ∈ {−1, +1}.

    L = λ_max(XᵀX)/(4n) + λ; c = λ (global strong convexity; the local c at w* is larger and
    reported as ``c_local``); M = (1/n)Σ‖x_i‖², M_V = 0, so μ/(L M_G) = 1/L. Needs λ > 0
    (``data=logistic`` checks it: :class:`~rescalelab.data.convex.LogisticData`).
    """

    name = "logistic"

    def __init__(
        self, x: Tensor, y: Tensor, lam: float, cache_dir: str | os.PathLike[str] | None = None,
        key: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(x, y, lam)
        xtx = self.x.T @ self.x / self.n
        self.L = float(torch.linalg.eigvalsh(xtx)[-1]) / 4 + self.lam
        self.c = self.lam
        self.M = float((self.x * self.x).sum(-1).mean())
        self.M_V = 0.0
        self.w_star, self.F_star, self.cached = self._solve(cache_dir, key or {})
        self.c_local = float(torch.linalg.eigvalsh(self.hessian(self.w_star))[0])

    def loss(self, z: Tensor, y: Tensor) -> Tensor:
        return F.softplus(-y * z)

    def dloss(self, z: Tensor, y: Tensor) -> Tensor:
        return -y * torch.sigmoid(-y * z)

    def hessian(self, w: Tensor) -> Tensor:
        p = torch.sigmoid(self.x @ w.to(DTYPE))
        return (self.x.T * (p * (1 - p))) @ self.x / self.n + self.lam * torch.eye(
            self.d, dtype=DTYPE
        )

    def newton(self, tol: float = 1e-13, max_iter: int = 100) -> Tensor:
        """w* by damped Newton in float64 (backtracking on F), to ‖∇F‖ ≤ ``tol``."""
        w = torch.zeros(self.d, dtype=DTYPE)
        for _ in range(max_iter):
            grad = self.gradient(w)
            if float(grad.norm()) <= tol:
                break
            step = torch.linalg.solve(self.hessian(w), grad)
            t, f0 = 1.0, float(self.objective(w))
            while (
                float(self.objective(w - t * step)) > f0 - 0.25 * t * float(grad @ step)
                and t > 1e-8
            ):
                t *= 0.5
            w = w - t * step
        return w

    def _digest(self, key: dict[str, Any]) -> str:
        h = hashlib.sha256(json.dumps({"problem": self.name, **key}, sort_keys=True).encode())
        h.update(self.x.numpy().tobytes())
        h.update(self.y.numpy().tobytes())
        h.update(repr(self.lam).encode())
        return h.hexdigest()[:20]

    def _solve(
        self, cache_dir: str | os.PathLike[str] | None, key: dict[str, Any]
    ) -> tuple[Tensor, float, bool]:
        path = Path(cache_dir) / f"logistic-{self._digest(key)}.pt" if cache_dir else None
        if path is not None and path.exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                w = saved["w_star"].to(DTYPE)
                if float(self.gradient(w).norm()) <= 1e-10:
                    return w, float(saved["F_star"]), True
            except (OSError, RuntimeError, KeyError, EOFError):
                pass  # unreadable or stale: solve again
        w = self.newton()
        f_star = float(self.objective(w))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"w_star": w, "F_star": f_star, "key": key}, tmp)
            os.replace(tmp, path)  # atomic: concurrent jobs never read half a file
        return w, f_star, False

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "c_local": self.c_local}
