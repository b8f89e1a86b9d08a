"""Torch's CPU threads: work beside the generation (reading LoRA files) runs on the calling thread alone.

Each thread that runs a parallel torch op on the CPU gets its own OpenMP team, and libgomp (torch's
OpenMP on Linux) counts the threads of all teams together: once they outnumber the cores, every team
stops spinning between parallel regions and sleeps on a futex instead, so each of the thousands of
small ops of a denoising loop pays a wake-up. Measured on 2 cores: after one rank-128 LoRA read on a
request thread, a base image of the embedded model took 250-370 ms instead of 95 ms, for as long as
that thread lived. Reading a LoRA is small, mostly serial work, so it gives up its team instead.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@functools.cache
def _openmp() -> tuple | None:
    """(omp_get_max_threads, omp_set_num_threads) of the OpenMP runtime torch loaded; None without one
    (a torch built without OpenMP, or a platform whose loader does not expose it)."""
    try:
        runtime = ctypes.CDLL(None)  # torch loads its OpenMP runtime into the global namespace
        return runtime.omp_get_max_threads, runtime.omp_set_num_threads
    except (OSError, AttributeError, TypeError):
        return None


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run the block's torch CPU ops on the calling thread only; its thread count is restored after.

    OpenMP's thread count is per thread, so the generation thread keeps all its cores meanwhile.
    """
    openmp = _openmp()
    if openmp is None:
        yield
        return
    get_max_threads, set_num_threads = openmp
    torch.get_num_threads()  # ATen sets a thread's count on its first parallel op: let it, so it cannot undo ours
    before = get_max_threads()
    set_num_threads(1)
    try:
        yield
    finally:
        set_num_threads(before)
