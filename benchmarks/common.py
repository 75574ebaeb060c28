"""Shared pieces of the benchmarks: the machine's own matmul peak and memory bandwidth, peak RSS."""

from __future__ import annotations

import resource
import time

import torch


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-`repeats` GFLOP/s of an n^3 matmul in `dtype`: the roofline's compute ceiling."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def sustained_matmul_gflops(n: int = 2048, seconds: float = 5.0, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of back-to-back n^3 matmuls in `dtype` over a window of `seconds`: the rate the
    machine holds, rather than its best single burst."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * count / elapsed / 1e9


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` GB/s of a large copy (read + write): the roofline's memory ceiling."""
    src = torch.empty(mb * 2**20 // 4)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
