"""Running a job on devices and processes: the Trainer factory, DDP launch, synchronized BatchNorm.

How ranks start (see ``docs/distributed.md``):

* **Lightning starts them** (``trainer=ddp_cpu``, and ``trainer=ddp`` on one node): the Hydra job
  builds everything, creates the one MLflow run, then ``trainer.fit`` *spawns* the ranks
  (``start_method=spawn``); each rank unpickles the trainer, module and data. The command line
  is never re-executed, so single runs and multiruns both keep one output directory per job.
* **Something else starts them** (``torchrun``, ``srun`` / ``hydra/launcher=submitit_slurm``):
  every rank runs the Hydra app; :func:`launch_rank` tells them apart *before* any run exists,
  so that only global rank 0 creates the MLflow run and writes Hydra's ``.hydra/`` files.

Correctness across ranks: the global minibatch of ``B`` samples is split into ``B / W`` per rank
(``W`` = world size); DDP averages the per-rank gradients, so one step follows the gradient of the
mean loss over the global batch, exactly as one process would. With ``norm.sync=true`` every
BatchNorm becomes :class:`GlobalBatchNorm`, whose statistics are those of the global batch,

    μ_c = Σ_r Σ_i x_ric / N,   σ²_c = Σ_r Σ_i (x_ric − μ_c)² / N,   N = Σ_r n_r,

so a W-rank job computes the same function (and gradients) as one process on the same batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins import LayerSync
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.distributed.nn.functional import all_reduce

from rescalelab.errors import ConfigError
from rescalelab.validate import check_global_batch

# -- who started this process ------------------------------------------------------------------


def cluster_environment() -> ClusterEnvironment:
    """The cluster environment Lightning will detect, in Lightning's own order of preference."""
    for env_type in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if env_type.detect():
            return env_type()
    return LightningEnvironment()


def launched_externally() -> bool:
    """``True`` when torchrun, srun, jsrun or mpirun started this process as one rank of several."""
    return cluster_environment().creates_processes_externally


def launch_rank() -> int:
    """Global rank of this process as set by an external launcher; 0 when Lightning starts the ranks.

    Known before ``torch.distributed`` is initialized, so it can decide who creates the MLflow run.
    """
    if not launched_externally():
        return 0
    return int(cluster_environment().global_rank())


# -- checks before any run exists ---------------------------------------------------------------


def _hydra_job() -> tuple[str | None, bool, str, str]:
    """The running Hydra job: (``trainer`` option, multirun?, launcher target, raw run dir)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, False, "", ""
    hc = HydraConfig.get()
    raw = OmegaConf.to_container(hc.run, resolve=False)
    return (
        hc.runtime.choices.get("trainer"),
        hc.mode == RunMode.MULTIRUN,
        str(OmegaConf.select(hc, "launcher._target_", default="")),
        str(raw.get("dir", "")) if isinstance(raw, dict) else "",
    )


def check_launch(cfg: DictConfig) -> None:
    """Checks on the hardware and the launch, run before the MLflow run is created.

    * a CUDA accelerator needs CUDA devices (``trainer=gpu`` / ``trainer=ddp`` on a CPU machine),
      as many as ``trainer.devices``; ``trainer.precision=bf16-*`` needs bf16 support;
    * on a CPU, ``trainer.precision=16-mixed`` is refused (Lightning would fail once the run
      exists), and so are several devices without a strategy (``trainer=cpu
      trainer.devices=4``: Lightning's launcher would re-execute the command line per rank);
    * the global batch ``data.batch_size`` must divide by the world size
      W = devices x ``trainer.num_nodes`` (``devices=auto`` resolved to the GPUs present);
    * several nodes need externally started ranks, and those ranks must number W;
    * torchrun/srun ranks of one single run must share a fixed ``hydra.run.dir``; a multirun
      inside such ranks (every rank would run the whole sweep) is refused, except under the
      submitit launcher, which runs one job per SLURM job.
    """
    t = cfg.trainer
    accelerator = str(t.get("accelerator", "auto"))
    devices = t.get("devices", "auto")
    num_nodes = int(t.get("num_nodes", 1) or 1)
    choice, multirun, launcher, run_dir = _hydra_job()
    if accelerator in ("gpu", "cuda"):
        choice = choice or ("ddp" if t.get("strategy") else "gpu")
        if not torch.cuda.is_available():
            cpu = "ddp_cpu" if choice.startswith("ddp") else "cpu"
            raise ConfigError(f"trainer={choice} needs a CUDA device; use trainer={cpu}")
        available = torch.cuda.device_count()
        if devices in ("auto", -1, "-1"):
            devices = available
        if isinstance(devices, int) and devices > available:
            raise ConfigError(
                f"trainer.devices={devices} is invalid: this machine has {available} CUDA device(s)"
            )
        precision = str(t.get("precision", "32-true"))
        if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"trainer.precision={precision} is invalid: this GPU has no bfloat16 support;"
                " use 16-mixed or 32-true"
            )
    elif str(t.get("precision", "32-true")) in ("16-mixed", "16") and (
        accelerator == "cpu" or not torch.cuda.is_available()
    ):
        raise ConfigError(
            f"trainer.precision={t.get('precision')} is invalid on a CPU: float16 AMP needs a "
            "GPU (Lightning would silently train in bf16-mixed); expected 32-true or bf16-mixed"
        )
    if devices != t.get("devices"):  # devices=auto, now a number (validate checked the rest)
        check_global_batch(cfg, devices)
    env = cluster_environment()
    if not env.creates_processes_externally:
        several = (isinstance(devices, int) and devices > 1) or (
            not isinstance(devices, (int, str)) and len(devices) > 1
        )
        if accelerator == "cpu" and several and not t.get("strategy"):
            # Lightning's default DDP launcher re-executes the command line for each rank,
            # which runs the whole Hydra app again; trainer=ddp_cpu spawns the ranks instead.
            raise ConfigError(
                f"trainer.devices={devices} is invalid with trainer={choice or 'cpu'} (one "
                f"process): for several CPU processes use trainer=ddp_cpu trainer.devices={devices}"
            )
        if num_nodes > 1:
            raise ConfigError(
                f"trainer.num_nodes={num_nodes} is invalid here: several nodes need ranks started "
                "by srun (hydra/launcher=submitit_slurm) or torchrun on every node"
            )
        return
    world = env.world_size()
    if isinstance(devices, int) and devices * num_nodes != world:
        raise ConfigError(
            f"trainer.devices={devices} x trainer.num_nodes={num_nodes} is invalid: "
            f"{type(env).__name__} started {world} ranks"
        )
    if world > 1 and multirun and "submitit" not in launcher:
        raise ConfigError(
            "a multirun inside torchrun/srun ranks is not supported: every rank would run the "
            "whole sweep; use hydra/launcher=submitit_slurm, or trainer=ddp_cpu / trainer=ddp "
            "(Lightning spawns the ranks of each job)"
        )
    if world > 1 and not multirun and "${now:" in run_dir:
        raise ConfigError(
            "hydra.run.dir is invalid under torchrun/srun: every rank runs the Hydra app, so "
            "the ranks need one fixed directory (pass hydra.run.dir=outputs/<name>)"
        )


# -- building the Trainer -----------------------------------------------------------------------


def ddp_strategy(start_method: str = "spawn", **kwargs: Any) -> DDPStrategy:
    """DDP that never re-executes the command line.

    Ranks started by torchrun/srun are used as they are; otherwise Lightning starts them with
    ``start_method`` (``spawn``: a fresh interpreter per rank that unpickles the trainer).
    ``kwargs`` go to :class:`~pytorch_lightning.strategies.DDPStrategy` (``process_group_backend``,
    ``timeout``, ``find_unused_parameters``, …).
    """
    if start_method == "popen":
        raise ConfigError(
            "trainer.strategy.start_method=popen is invalid: it re-executes the command line, "
            "which breaks Hydra multiruns; expected spawn, fork or forkserver"
        )
    # With torchrun/srun ranks the launcher is never used ("popen" checks for external ranks).
    return DDPStrategy(start_method="popen" if launched_externally() else start_method, **kwargs)


def build_trainer(
    *, channels_last: bool = False, sync_norm: bool = False, **kwargs: Any
) -> pl.Trainer:
    """``pl.Trainer(**kwargs)`` plus two switches Lightning does not have.

    The one factory every ``conf/trainer/*.yaml`` targets (``trainer=cpu`` too), so every
    trainer option builds the same kind of object.

    ``channels_last``: convert the model's 4-D weights to NHWC (:class:`ChannelsLast`); cuDNN then
    keeps every conv activation NHWC, which tensor cores prefer under bf16/fp16.
    ``sync_norm`` (``${norm.sync}``): under DDP, every BatchNorm uses the statistics of the
    global batch (:class:`SyncNormLayers`); no effect on one device.
    """
    callbacks = list(kwargs.pop("callbacks", None) or [])
    if channels_last:
        callbacks.append(ChannelsLast())
    plugins = list(kwargs.pop("plugins", None) or [])
    if sync_norm:
        plugins.append(SyncNormLayers(str(kwargs.get("accelerator", "cpu"))))
    return pl.Trainer(callbacks=callbacks, plugins=plugins or None, **kwargs)


class ChannelsLast(pl.Callback):
    """Stores every 4-D parameter (conv weights) channels-last before DDP wraps the model.

    Inputs stay NCHW: a convolution whose weight is channels-last returns channels-last output,
    so from the first conv on the activations are NHWC.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)


# -- synchronized BatchNorm -------------------------------------------------------------------


def _world_size() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks, for CPU ranks (gloo).

    torch's :class:`~torch.nn.SyncBatchNorm` (used on GPUs) refuses CPU modules. Here the batch
    statistics come from two differentiable all-reduces: ``[Σ x, n]`` gives μ, then
    ``Σ (x − μ)²`` gives the biased σ² used to normalize; the running variance gets the unbiased
    ``σ² N / (N − 1)``, as in :class:`~torch.nn.BatchNorm2d`. Backward all-reduces the gradients
    of those sums, so each rank's input gradient includes every rank's loss through μ and σ².
    In eval mode, or with one process, it is plain BatchNorm.
    """

    original_cls: type[nn.Module] = nn.BatchNorm2d

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world_size() < 2:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_full((1,), x.numel() / x.size(1))
        sums = all_reduce(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
        return y


def _swap_bn(module: nn.Module, make: Any) -> nn.Module:
    out = make(module)
    for name, child in module.named_children():
        out.add_module(name, _swap_bn(child, make))
    return out


def _is_local_bn(m: nn.Module) -> bool:
    synced = (nn.SyncBatchNorm, GlobalBatchNorm)
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, synced)


def _replace_bn(m: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` BatchNorm holding ``m``'s very parameters and buffers."""
    new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if m.affine:
        new.weight, new.bias = m.weight, m.bias
    if m.track_running_stats:
        new.running_mean, new.running_var = m.running_mean, m.running_var
        new.num_batches_tracked = m.num_batches_tracked
    new.train(m.training)
    new.original_cls = getattr(m, "original_cls", type(m))
    return new


class SyncNormLayers(LayerSync):
    """Lightning plugin: while a DDP fit runs, every BatchNorm uses the global batch's statistics.

    GPUs: torch's :class:`~torch.nn.SyncBatchNorm`; CPUs: :class:`GlobalBatchNorm`. The
    parameters and buffers are the same tensors before and after, and ``revert`` restores the
    original classes, so optimizers, checkpoints and parameter names do not change.
    """

    def __init__(self, accelerator: str = "cpu") -> None:
        self.cls = nn.SyncBatchNorm if accelerator in ("gpu", "cuda") else GlobalBatchNorm

    def apply(self, model: nn.Module) -> nn.Module:
        return _swap_bn(model, lambda m: _replace_bn(m, self.cls) if _is_local_bn(m) else m)

    def revert(self, model: nn.Module) -> nn.Module:
        def local(m: nn.Module) -> nn.Module:
            synced = isinstance(m, (nn.SyncBatchNorm, GlobalBatchNorm))
            return _replace_bn(m, m.original_cls) if synced else m

        return _swap_bn(model, local)


# -- checking replicas ----------------------------------------------------------------------


class DumpReplicaState(pl.Callback):
    """Each rank saves its module's parameters and buffers to ``<dirpath>/rank<r>.pt`` at the end.

    Replicas of a correct DDP job hold identical parameters and, for the running statistics
    that must agree (SyncBatchNorm, whitening μ and α), identical buffers; comparing the files
    shows it. Add it with ``+callbacks.replicas._target_=rescalelab.distributed.DumpReplicaState
    +callbacks.replicas.dirpath=<dir>``.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = Path(self.dirpath)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        norm = getattr(pl_module, "norm", None)
        torch.save(
            {
                "global_rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "pid": os.getpid(),
                "state": state,
                "norm": {
                    k: v for k, v in vars(norm).items() if isinstance(v, (int, float, str, bool))
                }
                if norm is not None
                else {},
            },
            path / f"rank{trainer.global_rank}.pt",
        )
