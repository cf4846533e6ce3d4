"""Step time of norm=none / bn / whitening side by side, interleaved in one process.

    .venv/bin/python scripts/bench_norm.py                          # small_cnn, batch 128, CPU
    .venv/bin/python scripts/bench_norm.py --model alexnet --image 64 --batch 32
    .venv/bin/python scripts/bench_norm.py --intervals 1 4 16 --rounds 40 --json out.json
    .venv/bin/python scripts/bench_norm.py --clock cpu     # CPU time: robust on a shared machine

One training step = the plug's ``on_train_batch_start``, forward, cross-entropy, backward, the
plug's ``before_optimizer_step`` (whitening: statistics update on update steps, then the gradient
transform), ``SGD.step``. Every variant gets its own model, optimizer and the same data tensors.
After a warm-up, each round times ``--steps`` steps of every variant in turn, alternating the
order (A B C, C B A, ...) so that slow drifts of a shared machine hit all variants alike. The
report gives each variant's median time per step and the median (and quartiles) of its per-round
ratio to ``none`` and to ``bn``; the targets are whitening ≤ 0.80 × bn and ≤ 1.05 × none at the
default statistics interval (every step; issue 17).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

import rescalelab
from rescalelab.geometry import layer_geometry
from rescalelab.norm import BatchNorm, NoNorm, NormPlug, Whitening

CONF = Path(rescalelab.__file__).parent / "conf"


def default_interval() -> int:
    return int(OmegaConf.load(CONF / "norm" / "whitening.yaml").interval)


def build(model: str, plug: NormPlug, shape: tuple[int, int, int], device: str):
    cfg = OmegaConf.load(CONF / "model" / f"{model}.yaml")
    net = instantiate(cfg, input_shape=shape, num_classes=10, norm=plug).to(device)
    plug.prepare(net, layer_geometry(net, shape))
    return net


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def step_timer(
    model: str, plug: NormPlug, shape, batch: int, steps: int, device: str, clock: str = "wall"
) -> Callable[[], float]:
    """A function that runs ``steps`` training steps and returns seconds per step."""
    net = build(model, plug, shape, device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(4, batch, *shape, generator=g).to(device)
    ys = torch.randint(0, 10, (4, batch), generator=g).to(device)
    state = {"step": 0}
    now = CLOCKS[clock]

    def run() -> float:
        sync(device)
        t0 = now()
        for _ in range(steps):
            k = state["step"]
            x, y = xs[k % 4], ys[k % 4]
            plug.on_train_batch_start(net, x, k)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            plug.before_optimizer_step(net)
            opt.step()
            state["step"] = k + 1
        sync(device)
        return (now() - t0) / steps

    return run


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # (with --clock cpu on CUDA the host's wait counts too)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return (values[0],) * 3
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="small_cnn", help="a conf/model option (default small_cnn)")
    p.add_argument("--image", type=int, default=32, help="input side (default 32)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--intervals", type=int, nargs="*", default=None,
                   help="whitening statistics intervals (default: the config's, and 1)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall: perf_counter; cpu: process CPU time (robust on a shared CPU)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (3, args.image, args.image)
    default = default_interval()
    intervals = args.intervals or sorted({default, 1})
    plugs: dict[str, NormPlug] = {"none": NoNorm(), "bn": BatchNorm()}
    for k in intervals:
        plugs[f"whitening/{k}"] = Whitening(interval=k)
    fns = {
        name: step_timer(args.model, plug, shape, args.batch, args.steps, args.device, args.clock)
        for name, plug in plugs.items()
    }
    names = list(fns)
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name].append(fns[name]())
    result: dict = {
        "model": args.model, "image": args.image, "batch": args.batch, "device": args.device,
        "threads": args.threads, "steps": args.steps, "rounds": args.rounds, "clock": args.clock,
        "default_interval": default, "variants": {},
    }  # fmt: skip
    print(f"{args.model} {shape} batch {args.batch} on {args.device}, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.steps} steps, {args.clock} clock "
          f"(default interval {default})")  # fmt: skip
    print(f"{'variant':<14} {'ms/step':>9} {'/none [q25, q75]':>24} {'/bn [q25, q75]':>24}")
    for name in names:
        row = {"ms_per_step": 1e3 * statistics.median(samples[name])}
        for base in ("none", "bn"):
            row[f"vs_{base}"] = quartiles([a / b for a, b in zip(samples[name], samples[base])])
        result["variants"][name] = row
        fmt = "{1:6.3f} [{0:.3f}, {2:.3f}]"
        print(f"{name:<14} {row['ms_per_step']:9.2f} {fmt.format(*row['vs_none']):>24} "
              f"{fmt.format(*row['vs_bn']):>24}")  # fmt: skip
    w = result["variants"][f"whitening/{default}"]
    result["holds"] = w["vs_bn"][1] <= 0.80 and w["vs_none"][1] <= 1.05
    print(f"target whitening/{default} <= 0.80 x bn and <= 1.05 x none: "
          f"{'holds' if result['holds'] else 'MISSED'}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
