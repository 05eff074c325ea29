"""from modkd.pipelines.toyworld.parallel import in_parallel; in_parallel([(fn, args, kwargs), ...])

Runs independent toy jobs side by side (the demo's extraction beside the student LLM's pretraining, its
two student arms, its evaluations): one spawned process per job, at most one per CPU core, each with an
equal share of the cores as torch threads. The toy models are so small that one training loop gains
little from a second thread (measured on a 2-core machine shared with other jobs: 0.19 s per pretraining
step with one torch thread, 2.3 s with two), while two loops side by side take about the time of one.
Sequential on a GPU, or with one core.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

Job = tuple[Callable, tuple, dict]


def _threads(n: int) -> None:
    torch.set_num_threads(n)
    sys.stdout.reconfigure(line_buffering=True)  # a worker's progress lines appear as they are written


@contextmanager
def one_thread_between_jobs() -> Iterator[None]:
    """One torch thread for toy work done in-process between side-by-side phases (the demo's shared init), for
    the reason in the module docstring; the previous count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_parallel(jobs: list[Job]) -> list[Any]:
    """The jobs' results, in order; a job's exception is raised here."""
    cores = os.cpu_count() or 1
    if len(jobs) < 2 or cores < 2 or torch.cuda.is_available():
        return [fn(*args, **kwargs) for fn, args, kwargs in jobs]
    workers = min(len(jobs), cores)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_threads, initargs=(max(1, cores // workers),)) as pool:
        futures = [pool.submit(fn, *args, **kwargs) for fn, args, kwargs in jobs]
        return [f.result() for f in futures]
