"""Row 5: does the input pipeline keep up with training? Images/s delivered vs consumed, one run.

For each pipeline it measures, in the same process and on the same device:

* **delivered** — images/s coming out of the pipeline, ready for the model (on the device,
  cropped, flipped, normalized), over whole epochs;
* **consumed** — images/s of a training step of the matching model (forward, cross-entropy,
  backward, SGD step) on a batch already on the device;

and reports ``ratio = delivered / consumed`` (≥ 5 means data never limits training).

Pipelines: ``cifar10`` (uint8 tensors on the device + batched crop/flip, SmallCNN),
``imagenet_cache`` (the memory-mapped cache moved to the device + batched crop 224/flip, AlexNet)
and ``imagenet_folder`` (DataLoader workers decoding JPEGs, pinned memory, AlexNet). The data are
the test fixtures' real formats (:mod:`rescalelab.data.fixtures`) written to a temporary folder: CIFAR-10
pickles, and JPEGs of ImageNet-like size (crops of 300–427 px of real photos). The one-time cost
of building the cache (decode + resize, images/s) is reported too.

    python scripts/bench_data.py                       # CPU, small sizes
    python -m rescalelab.bench.data --device cuda --json bench_data.json
    rescalelab-bench --rows data                       # the same rows in the benchmark's table
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rescalelab.bench.timing import Comparison, sync
from rescalelab.data import CIFAR10, ImageNetSubset
from rescalelab.data.fixtures import write_cifar10, write_imagefolder
from rescalelab.models import AlexNet, SmallCNN


def delivered_rate(
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
    epochs: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Images/s out of ``batches()`` over ``epochs`` epochs, after a warm-up epoch; each batch
    is moved to ``device`` (non-blocking from pinned memory) and transformed if asked."""

    def run(n_epochs: int) -> tuple[int, float]:
        n, start = 0, time.perf_counter()
        for _ in range(n_epochs):
            for x, _y in batches():
                x = x.to(device, non_blocking=True)
                if transform is not None:
                    x = transform(x)
                n += len(x)
        sync(device)
        return n, time.perf_counter() - start

    run(1)
    n, seconds = run(epochs)
    return n / seconds


def consumed_rate(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    classes: int,
    batch: int,
    device: torch.device,
    steps: int,
) -> float:
    """Images/s of SGD training steps of ``model`` on a batch already on ``device``."""
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def _row(pipeline: str, model: str, device: torch.device, batch: int, images: int,
         delivered: float, consumed: float, **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "pipeline": pipeline, "model": model, "device": str(device), "batch_size": batch,
        "images": images, "delivered_img_s": round(delivered, 1),
        "consumed_img_s": round(consumed, 1), "ratio": round(delivered / consumed, 2), **extra,
    }  # fmt: skip


def bench(
    device: str = "cpu",
    *,
    cifar_images: int | None = None,
    imagenet_images: int | None = None,
    workers: int | None = None,
    batch: int | None = None,
    image_size: int = 224,
    workdir: str | None = None,
) -> list[dict[str, Any]]:
    """The three rows (cifar10, imagenet_cache, imagenet_folder); sizes default by device."""
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    cifar_images = cifar_images or (50_000 if gpu else 5_000)
    imagenet_images = imagenet_images or (4_096 if gpu else 384)
    workers = workers if workers is not None else max(1, (os.cpu_count() or 2) - 1)
    big_batch = batch or (256 if gpu else 32)
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        # -- CIFAR-10: uint8 tensors on the device, batched augmentation, SmallCNN ---------------
        write_cifar10(root / "cifar", per_batch=cifar_images // 5, test=100)
        dm = CIFAR10(root=str(root / "cifar"), batch_size=128)
        dm.setup()
        dm.tensors = {k: v.to(dev) for k, v in dm.tensors.items()}
        loader = dm.train_dataloader()
        delivered = delivered_rate(lambda: loader, dev, epochs=3)
        consumed = consumed_rate(SmallCNN((3, 32, 32), 10), (3, 32, 32), 10, 128, dev, 30)
        rows.append(_row("cifar10", "small_cnn", dev, 128, cifar_images, delivered, consumed))

        # -- ImageNet-like JPEGs: the cache, then the raw folder ----------------------------------
        per_class = imagenet_images // 8
        write_imagefolder(
            root / "imagenet", num_classes=8, train_counts=[per_class] * 8, val_count=1,
            min_side=300, max_side=427,
        )  # fmt: skip
        common = {"root": str(root / "imagenet"), "fraction": 1.0, "num_classes": None,
                  "image_size": image_size, "batch_size": big_batch, "num_workers": workers,
                  "progress": False}  # fmt: skip
        cached = ImageNetSubset(cache=str(root / "cache"), **common)
        start = time.perf_counter()
        built = cached.prepare_cache()
        build_rate = built["decoded"] / (time.perf_counter() - start)
        cached.setup()
        cached.tensors = {k: v.to(dev) for k, v in cached.tensors.items()}
        loader = cached.train_dataloader()
        delivered = delivered_rate(lambda: loader, dev, epochs=3)
        shape = (3, image_size, image_size)
        consumed = consumed_rate(
            AlexNet(shape, 1000), shape, 1000, big_batch, dev, 3 if not gpu else 20
        )
        rows.append(_row("imagenet_cache", "alexnet", dev, big_batch, imagenet_images, delivered,
                         consumed, cache_build_img_s=round(build_rate, 1), workers=workers))  # fmt: skip

        raw = ImageNetSubset(**common, check="header")
        raw.setup()
        folder_loader = raw.folder_loader("train", big_batch, train=True, pin=gpu)
        tf = raw.train_transform()
        g = torch.Generator().manual_seed(0)
        delivered = delivered_rate(lambda: folder_loader, dev, epochs=1,
                                   transform=lambda x: tf(x, g))  # fmt: skip
        rows.append(_row("imagenet_folder", "alexnet", dev, big_batch, imagenet_images,
                         delivered, consumed, workers=workers))  # fmt: skip
    return rows


def data_rows(device: str, quick: bool) -> list[Comparison]:
    """:func:`bench`'s rows as the benchmark's comparisons (``--quick``: a few images)."""
    sizes = {"cifar_images": 500, "imagenet_images": 32, "batch": 8} if quick else {}
    out = []
    for r in bench(device, **sizes):
        c = Comparison(
            row=f"data/{r['pipeline']} ({r['model']}, batch {r['batch_size']})",
            unit="img/s",
            base="consumed",
            medians={"delivered": r["delivered_img_s"], "consumed": r["consumed_img_s"]},
            ratios={"delivered": (r["ratio"], r["ratio"], r["ratio"])},
        )
        if r["pipeline"] != "imagenet_folder":
            c.target, c.holds = "delivered / consumed >= 5", r["ratio"] >= 5
        out.append(c)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cifar-images", type=int, default=None)
    ap.add_argument("--imagenet-images", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="AlexNet batch size")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(args.device, cifar_images=args.cifar_images,
                 imagenet_images=args.imagenet_images, workers=args.workers, batch=args.batch)  # fmt: skip
    head = (
        f"{'pipeline':16} {'model':10} {'delivered img/s':>16} {'consumed img/s':>15} {'ratio':>7}"
    )
    print(head)
    for r in rows:
        print(f"{r['pipeline']:16} {r['model']:10} {r['delivered_img_s']:16.0f} "
              f"{r['consumed_img_s']:15.1f} {r['ratio']:7.1f}")  # fmt: skip
    print(f"cache build (decode + resize): {rows[1]['cache_build_img_s']:.0f} img/s with "
          f"{rows[1]['workers']} workers; device {rows[0]['device']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
