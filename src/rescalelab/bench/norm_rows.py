"""Rows 2 and 7: one training step per norm plug (and per optimizer), side by side."""

from __future__ import annotations

from rescalelab.bench.steps import step_timer
from rescalelab.bench.timing import Comparison, compare, interleave, ratio_quartiles

# (model, batch, image px) of the norm rows; whitening at its default, statistics every step.
NORM_SHAPES = (("small_cnn", 128, 32), ("resnet20", 128, 32), ("alexnet", 32, 64),
               ("alexnet", 32, 224))  # fmt: skip
# whitening/none and whitening/bn targets (issue 17): AlexNet at 64 px, where BN's feature maps
# are tiny (15, 7, 3, 1 px) and the 58 M fully-connected weights dominate, gets whitening/bn <= 1.
NORM_TARGETS = {("alexnet", 64): (1.05, 1.0)}


def _norm_sizes(device: str, quick: bool, model: str, image: int) -> tuple[int, int]:
    """(steps per sample, rounds) of a norm row."""
    if quick:
        return 2, 2
    if model == "small_cnn":
        return 40, 15  # small steps: shorter samples would let the machine's noise in
    if image >= 224:
        return (10, 9) if device.startswith("cuda") else (1, 5)
    return (40, 9) if device.startswith("cuda") else (3, 9)


def row_norm(
    device: str, quick: bool, model: str = "small_cnn", batch: int = 128, image: int = 32,
    bf16: bool = False,
) -> Comparison:  # fmt: skip
    """One training step with norm none, bn and whitening (its default: statistics every step)."""
    steps, rounds = _norm_sizes(device, quick, model, image)
    fns = {
        name: step_timer(model, name, batch, steps, device, image=image, bf16=bf16)
        for name in ("none", "bn", "whitening")
    }
    samples = interleave(fns, rounds)
    precision = "bf16" if bf16 else "fp32"
    c = compare(
        f"norm ({model}, batch {batch}, {image}px, {device} {precision})", samples, base="none"
    )
    wb = ratio_quartiles(samples["whitening"], samples["bn"])
    to_none, to_bn = NORM_TARGETS.get((model, image), (1.05, 0.80))
    c.target = f"whitening/none <= {to_none:.2f} and whitening/bn <= {to_bn:.2f}"
    c.holds = c.ratios["whitening"][1] <= to_none and wb[1] <= to_bn
    c.notes.append(f"whitening/bn = {wb[1]:.3f} [{wb[0]:.3f}, {wb[2]:.3f}]")
    return c


def norm_rows(device: str, quick: bool) -> list[Comparison]:
    """The norm rows (``--quick``: small_cnn only, a few steps); on CUDA each in fp32 and in
    bf16 autocast."""
    shapes = NORM_SHAPES[:1] if quick else NORM_SHAPES
    precisions = (False, True) if device.startswith("cuda") else (False,)
    return [
        row_norm(device, quick, model, batch, image, bf16)
        for model, batch, image in shapes
        for bf16 in precisions
    ]


BASELINE_NORMS = ("bn", "layernorm", "groupnorm", "weightnorm", "batch_renorm", "whitening")
BASELINE_OPTIMS = ("sgd_nesterov", "adamw", "soap", "muon")


def row_baselines(device: str, quick: bool) -> list[Comparison]:
    """Step cost of each norm (with SGD) and each optimizer (no norm) relative to none + SGD
    (docs/baselines.md)."""
    rows = []
    models = ("small_cnn",) if quick else ("small_cnn", "resnet20")
    for model in models:
        if quick:
            steps, rounds, batch, image = 2, 1, 32, 16
        else:
            steps, rounds, batch, image = (
                (20, 7, 128, 32) if model == "small_cnn" else (3, 5, 128, 32)
            )
        variants = [("none", "sgd")] + [(n, "sgd") for n in BASELINE_NORMS]
        variants += [("none", o) for o in BASELINE_OPTIMS]
        fns = {
            f"{n}+{o}": step_timer(model, n, batch, steps, device, optim=o, image=image)
            for n, o in variants
        }
        samples = interleave(fns, rounds)
        rows.append(compare(f"baselines step time ({model}, batch {batch}, {image}px)", samples,
                            base="none+sgd"))  # fmt: skip
    return rows
