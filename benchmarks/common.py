"""Shared pieces of the benchmarks: the machine's own matmul peak and memory bandwidth, peak RSS."""

from __future__ import annotations

import resource
import time

import torch


def sync(device="cpu") -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_size(device="cpu") -> int:
    """n for the n^3 peak matmuls: 2048 fills a CPU, a GPU needs 8192 to reach its peak."""
    return 8192 if torch.device(device).type == "cuda" else 2048


def matmul_peak_gflops(n: int | None = None, repeats: int = 5, dtype: torch.dtype = torch.float32, device="cpu") -> float:
    """Best-of-`repeats` GFLOP/s of an n^3 matmul in `dtype`: the roofline's compute ceiling."""
    n = n or matmul_size(device)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def sustained_matmul_gflops(
    n: int | None = None, seconds: float = 5.0, dtype: torch.dtype = torch.float32, device="cpu"
) -> float:
    """GFLOP/s of back-to-back n^3 matmuls in `dtype` over a window of `seconds`: the rate the
    machine holds, rather than its best single burst."""
    n = n or matmul_size(device)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        sync(device)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * count / elapsed / 1e9


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5, device="cpu") -> float:
    """Best-of-`repeats` GB/s of a large copy (read + write): the roofline's memory ceiling."""
    src = torch.empty(mb * 2**20 // 4, device=device)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def peak_device_gb(device) -> float | None:
    """Peak memory allocated on a CUDA device so far, in GB (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
