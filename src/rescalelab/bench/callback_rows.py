"""Rows 3 and 8: full fits with one callback group against ``callbacks=default``."""

from __future__ import annotations

from pathlib import Path

from rescalelab.bench.fits import fit_timer
from rescalelab.bench.timing import Comparison, compare, interleave


def _callback_row(
    root: Path,
    device: str,
    title: str,
    variants: dict[str, list[str]],
    sizes: tuple[int, int, int, int],
    target: tuple[str, float],
    quick: bool,
) -> Comparison:
    """Full fits with each variant's overrides, interleaved; ``target = (variant, max ratio)``
    of that variant's step time to ``default``'s (``quick``: no warm-up fit, a smoke run)."""
    steps, epochs, rounds, batch = sizes
    trainer = ["trainer=gpu"] if device.startswith("cuda") else []
    samples = interleave(
        {
            name: fit_timer(root, [*trainer, *extra], steps, batch, logger=True, epochs=epochs)
            for name, extra in variants.items()
        },
        rounds,
        warmup=0 if quick else 1,
    )
    c = compare(title, samples, base="default")
    name, limit = target
    c.target, c.holds = f"{name} / default step time <= {limit:.2f}", c.ratios[name][1] <= limit
    return c


def row_drift(root: Path, device: str, quick: bool) -> Comparison:
    """``callbacks=drift`` at its default schedule against ``callbacks=default``."""
    # The drift schedule is dense early and sparse later (as is its probe), so its overhead is
    # measured over a run as long as the default experiment (10 epochs of 78 steps).
    sizes = (6, 2, 2, 128) if quick else (780, 10, 5, 128)
    variants = {"default": ["callbacks=default"], "drift": ["callbacks=drift"]}
    return _callback_row(
        root, device, "drift callback (default schedule)", variants, sizes, ("drift", 1.05), quick
    )


def row_train_eval(root: Path, device: str, quick: bool) -> Comparison:
    """The cost of ``train_eval/loss``: one no-grad forward over the ~10k training samples per
    epoch, i.e. about (forward cost) / (training-step cost) ≈ 1/3 of an epoch's time."""
    sizes = (6, 2, 2, 128) if quick else (780, 10, 5, 128)
    variants = {
        "default": ["callbacks=default"],
        "train_eval": ["callbacks=train_eval"],
        "train_eval_1024": ["callbacks=train_eval", "data.train_eval_size=1024"],
    }
    title = "train_eval callback (every epoch)"  # target: one forward pass per epoch
    return _callback_row(root, device, title, variants, sizes, ("train_eval", 1.40), quick)


def row_stepsizes(root: Path, device: str, quick: bool) -> Comparison:
    """``callbacks=stepsizes`` against ``callbacks=default``, both on whitening."""
    # The stepsize instrument's cost is per logging step (a few reductions) and per epoch (a
    # weight copy, a median per layer): measured on whitening, where it reads the most buffers.
    sizes = (6, 2, 2, 128) if quick else (390, 5, 5, 128)
    variants = {
        "default": ["norm=whitening", "callbacks=default"],
        "stepsizes": ["norm=whitening", "callbacks=stepsizes"],
    }
    title = "stepsizes callback (whitening)"
    return _callback_row(root, device, title, variants, sizes, ("stepsizes", 1.02), quick)
