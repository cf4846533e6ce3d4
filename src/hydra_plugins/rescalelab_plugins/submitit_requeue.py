"""Preempted or timed-out SLURM jobs requeue themselves and resume their own run.

With ``hydra/launcher=submitit_slurm`` each Hydra job is one submitit job. SLURM sends it
SIGUSR2 ``signal_delay_s`` seconds before its time limit (or when it is preempted); submitit's
handler then calls the submitted callable's ``checkpoint()``, pickles what it returns as the
job's new submission and requeues the job (``scontrol requeue``), at most ``max_num_timeout``
times for time-outs. The requeued job runs that new submission.

:class:`SlurmLauncher` is hydra-submitit-launcher's launcher whose ``checkpoint()`` returns the
same job with ``resume=true`` added, so the requeued job continues the MLflow run of its output
directory from ``checkpoints/last.ckpt`` (:mod:`rescalelab.resume`), with no user action. And
:class:`~rescalelab.callbacks.checkpoint.LastCheckpoint` holds SIGUSR2 back to the end of the
current training step: it commits ``last.ckpt`` there, then hands the signal to submitit, so the
requeued job loses no step. :class:`LocalLauncher` is the same for submitit's local executor
(``hydra/launcher=submitit_local hydra.launcher._target_=hydra_plugins.rescalelab_plugins.submitit_requeue.LocalLauncher``),
which drives the same signal path on one machine.
"""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_submitit_launcher import submitit_launcher


def with_resume(overrides: list[str]) -> list[str]:
    """The job's overrides with ``resume=true`` (replacing any ``resume=...``)."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume"] + ["resume=true"]


class _Requeueing:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The job, in the process submitit started, which composes the job's config again.

        Hydra's singleton state (``singleton_state``) already carries the parent's OmegaConf
        resolvers, ``rescalelab.*`` included; :func:`~rescalelab.resolvers.composing` also
        silences the ``submitit_slurm`` schema notice of that composition.
        """
        from rescalelab.resolvers import composing

        with composing():
            return super().__call__(*args, **kwargs)  # type: ignore[misc]

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        """What submitit requeues: this job again, resuming its run."""
        import submitit

        return submitit.helpers.DelayedSubmission(
            self, with_resume(sweep_overrides), *args, **kwargs
        )


class SlurmLauncher(_Requeueing, submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher; a requeued job resumes its run."""


class LocalLauncher(_Requeueing, submitit_launcher.LocalLauncher):
    """hydra-submitit-launcher's local launcher; a requeued job resumes its run."""
