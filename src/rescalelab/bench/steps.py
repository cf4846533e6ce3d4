"""Training steps timed without Lightning: one norm plug and optimizer on one model, and the bare
loop (the floor every framework row is compared with)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rescalelab import norm as norms
from rescalelab.bench.timing import sync
from rescalelab.geometry import layer_geometry
from rescalelab.models import AlexNet, ResNet20, SmallCNN
from rescalelab.optim.preconditioned import SOAP, Muon

MODELS = {"alexnet": AlexNet, "resnet20": ResNet20, "small_cnn": SmallCNN}
PLUGS = {
    "none": norms.NoNorm, "bn": norms.BatchNorm, "layernorm": norms.LayerNorm,
    "groupnorm": norms.GroupNorm, "weightnorm": norms.WeightNorm,
    "batch_renorm": norms.BatchRenormPlug, "whitening": norms.Whitening,
}  # fmt: skip
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
    "soap": lambda p: SOAP(p), "muon": lambda p: Muon(p),
}  # fmt: skip


def synthetic(
    n: int, shape: tuple[int, ...], classes: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Gaussian inputs of ``shape`` and uniform labels, seeded, on ``device``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    return x.to(device), torch.randint(0, classes, (n,), generator=g).to(device)


def step_timer(
    model_name: str, norm_name: str, batch: int, steps: int, device: str, *,
    optim: str = "sgd", image: int = 32, bf16: bool = False,
) -> Callable[[], float]:  # fmt: skip
    """A function timing ``steps`` training steps (seconds per step) of one configuration.

    One step: the plug's ``on_train_batch_start``, forward, cross-entropy, backward, the plug's
    ``before_optimizer_step`` (whitening: statistics update, then the gradient transform), the
    optimizer's step, on four batches in turn. ``bf16``: forward and loss under
    ``torch.autocast(bfloat16)`` (weights, gradients and the whitening statistics stay float32),
    as ``trainer.precision=bf16-mixed`` runs them.
    """
    shape = (3, image, image)
    plug = PLUGS[norm_name]()
    model = MODELS[model_name](shape, 10, norm=plug).to(device)
    plug.prepare(model, layer_geometry(model, shape))
    opt = OPTIMIZERS[optim](list(model.parameters()))
    x, y = synthetic(batch * 4, shape, 10, device)
    state = {"k": 0}
    kind = device.split(":")[0]

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            i = state["k"] % 4
            xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
            plug.on_train_batch_start(model, xb, state["k"])
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            plug.before_optimizer_step(model)
            opt.step()
            state["k"] += 1
        sync(device)
        return (time.perf_counter() - t0) / steps

    return run


def bare_loop_timer(
    batch: int, steps: int, device: str, *, bf16: bool = False, compile: bool = False
) -> Callable[[], float]:
    """The floor: small_cnn, tensors on the device, SGD, no logging, no callbacks.

    Each call is one epoch over ``batch * steps`` samples in a fresh random order, gathered
    batch by batch as any training loop that shuffles must (and as the framework's
    ``TensorBatches`` does): the comparison is between loops doing the same work.
    """
    model = SmallCNN((3, 32, 32), 10).to(device)
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = synthetic(batch * steps, (3, 32, 32), 10, device)
    g = torch.Generator().manual_seed(0)

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        order = torch.randperm(len(x), generator=g).to(device)
        for k in range(steps):
            idx = order[k * batch : (k + 1) * batch]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(step_model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        return (time.perf_counter() - t0) / steps

    return run
