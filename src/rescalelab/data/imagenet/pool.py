"""Chunks of images over a ``concurrent.futures`` pool, with a Rich progress bar.

The file check and the cache builder both cut their images into chunks and hand each chunk to a
worker; ``on_result`` runs in the calling process as each chunk completes (in completion
order), so what is done is recorded while the rest is still running: an interrupted cache build
resumes from there. A failure in ``on_result`` (a corrupt image, Ctrl-C) cancels the chunks not
yet started.
"""

from __future__ import annotations

import multiprocessing as mp
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

Chunk = TypeVar("Chunk", bound=Sequence)


def executor(workers: int) -> Executor:
    """``workers`` processes, or one thread of this process for ``workers <= 1``.

    Decoding is CPU-bound Python/PIL work: processes scale it. The processes are forked: they
    need only PIL and numpy, and a fresh interpreter would import torch again (seconds each).
    """
    if workers <= 1:
        return ThreadPoolExecutor(max_workers=1)
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def run_chunks(
    fn: Callable[[Chunk], Any],
    chunks: Sequence[Chunk],
    on_result: Callable[[Any, Chunk], None],
    *,
    workers: int,
    description: str,
    progress: bool,
) -> None:
    """Run ``fn(chunk)`` for every chunk and call ``on_result(result, chunk)`` as each completes;
    the bar counts images (``len(chunk)``)."""
    columns = ["{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    bar = Progress(*columns, disable=not progress, redirect_stdout=False)
    with bar, executor(workers) as pool:
        task = bar.add_task(description, total=sum(len(c) for c in chunks))
        with warnings.catch_warnings():  # Python >= 3.12 warns on fork with threads running
            warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks")
            futures = {pool.submit(fn, chunk): chunk for chunk in chunks}
        try:
            for fut in as_completed(futures):
                on_result(fut.result(), futures[fut])
                bar.advance(task, len(futures[fut]))
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
