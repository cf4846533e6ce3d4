"""Rows 1, 4 and 6: the framework against the bare loop and Lightning alone, the MLflow logger
against none, and the bare loop's precision and compile variants."""

from __future__ import annotations

from pathlib import Path

from rescalelab.bench.fits import fit_timer, lightning_timer
from rescalelab.bench.steps import bare_loop_timer
from rescalelab.bench.timing import Comparison, compare, interleave, ratio_quartiles


def row_framework(root: Path, device: str, quick: bool) -> list[Comparison]:
    """``framework`` (rescalelab / bare loop, with Lightning alone's floor) and ``logging``."""
    steps, rounds, batch = (6, 2, 128) if quick else (390, 7, 128)
    trainer = ["trainer=gpu"] if device.startswith("cuda") else []
    warmup = 0 if quick else 1  # --quick: a smoke run, no warm-up fit
    samples = interleave(
        {
            "bare": bare_loop_timer(batch, steps, device),
            "lightning": lightning_timer(batch, steps, device),
            "rescalelab": fit_timer(root, trainer, steps, batch),
        },
        rounds,
        warmup=warmup,
    )
    c = compare("framework (small_cnn, batch 128)", samples, base="rescalelab")
    # steps/s ratio framework/bare = time(bare)/time(framework)
    q25, med, q75 = c.ratios["bare"]
    c.target, c.holds = "steps/s rescalelab / bare >= 0.90", med >= 0.90
    c.notes.append(f"steps/s ratio rescalelab/bare = {med:.3f} [{q25:.3f}, {q75:.3f}]")
    floor = ratio_quartiles(samples["bare"], samples["lightning"])
    c.notes.append(
        f"steps/s ratio lightning alone/bare = {floor[1]:.3f} [{floor[0]:.3f}, {floor[2]:.3f}]"
    )
    rows = [c]
    samples = interleave(
        {
            "no_logger": fit_timer(root, trainer, steps, batch, logger=False),
            "mlflow": fit_timer(root, trainer, steps, batch),
        },
        rounds,
        warmup=warmup,
    )
    c = compare("logging (MLflow logger vs none)", samples, base="no_logger")
    c.target, c.holds = "mlflow / no_logger step time <= 1.02", c.ratios["mlflow"][1] <= 1.02
    rows.append(c)
    return rows


def row_gpu_variants(device: str, quick: bool) -> Comparison:
    """bf16 autocast and ``torch.compile`` against fp32, bare loop (row 6).

    Part of the default rows on a GPU; on a CPU only when asked (``--rows gpu``): the CPU has
    no bf16 speed-up to show and compiling is slow there, but the path is the same code.
    """
    # --quick: a CPU's bf16 autocast step at batch 512 takes about a second; the smoke run only
    # needs each variant (and its compilation) to go through.
    steps, rounds, batch = (2, 2, 128) if quick else (200, 7, 512)
    fns = {
        "fp32": bare_loop_timer(batch, steps, device),
        "bf16": bare_loop_timer(batch, steps, device, bf16=True),
        "compile": bare_loop_timer(batch, steps, device, compile=True),
        "compile_bf16": bare_loop_timer(batch, steps, device, bf16=True, compile=True),
    }
    row = f"precision and compile variants (bare loop, small_cnn, batch {batch}, {device})"
    return compare(row, interleave(fns, rounds, warmup=2), "fp32")
