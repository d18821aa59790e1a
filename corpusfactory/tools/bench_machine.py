"""This machine's measured figures for the benchmarks: its matrix-multiply peak, its
memory bandwidth (a streaming read, and a copy), the CPUs this process may use and a short
description of it."""

from __future__ import annotations

import itertools
import math
import os
import platform
import time
from typing import Any


def matmul_peak_gflops(
    n: int = 2048, reps: int = 10, device: str = "cpu", dtype: str = "float32"
) -> float:
    """Best-of GEMM throughput with torch (CPU threads, or a GPU), in GFLOP/s."""
    import torch

    dt_ = getattr(torch, dtype)
    if device != "cpu":
        n = max(n, 8192)
    a = torch.randn(n, n, device=device, dtype=dt_)
    b = torch.randn(n, n, device=device, dtype=dt_)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        best = max(best, 2.0 * n**3 / dt / 1e9)
    return best


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def cores() -> int:
    """The CPUs this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _slices(n: int, k: int) -> list[slice]:
    """``range(n)`` in ``k`` contiguous slices of (nearly) equal length."""
    edges = [n * i // k for i in range(k + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


def memory_bandwidth_gbs(mib: int = 256, reps: int = 10, threads: int | None = None) -> float:
    """This machine's *copy* bandwidth in GB/s: bytes read plus bytes written per second
    by a copy of a ``mib`` MiB float64 array (far beyond the caches), split into one
    slice per thread (numpy releases the GIL while copying), best of ``reps``."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = mib * 2**20 // 8
    src = np.ones(n)
    dst = np.empty(n)  # its pages are first touched by the warm-up, not while timed
    k = threads or cores()
    slices = _slices(n, k)

    def copy(part: slice) -> None:
        np.copyto(dst[part], src[part])

    best = math.inf
    with ThreadPoolExecutor(k) as pool:
        list(pool.map(copy, slices))  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            list(pool.map(copy, slices))
            best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def memory_read_bandwidth_gbs(mib: int = 512, reps: int = 10, threads: int | None = None) -> float:
    """This machine's *read* bandwidth in GB/s: bytes read per second by a sum of a ``mib``
    MiB float64 array (far beyond the caches), one contiguous slice per thread on
    ``threads`` threads (numpy releases the GIL in the reduction), best of ``reps``.

    This is the traffic of a decode step, which streams the weights and writes almost
    nothing; a copy's figure also counts the writes (and their read-for-ownership).
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = mib * 2**20 // 8
    src = np.ones(n)  # written once here, so every page is mapped before timing
    k = threads or cores()
    slices = _slices(n, k)

    def read(part: slice) -> float:
        return float(src[part].sum())

    best = math.inf
    with ThreadPoolExecutor(k) as pool:
        list(pool.map(read, slices))  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            list(pool.map(read, slices))
            best = min(best, time.perf_counter() - t)
    return src.nbytes / best / 1e9
