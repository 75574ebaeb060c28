"""A training step at the published CIFAR-10 config: seconds, peak memory, model FLOPs utilization.

12 layers, d 512, 4 heads, d_ff 2048, local 1D block 256 (512 keys), dropout 0.3, batch 4, Adam.
Model FLOPs per step = 6 x non-embedding parameters x sub-pixels
                     + 12 x layers x d x (keys each query may see) x sub-pixels,
utilization = model FLOPs / best seconds / the machine's own matmul peak in the precision the step
uses (fp32, or bf16 for bf16 mixed precision), measured in the same run. Peak memory is the
process's peak resident set.

--precision auto|fp32|bf16 picks the step's precision as `imagetx train` does (auto: bf16 autocast
on CPUs with AMX-BF16 or AVX512-BF16). When it is bf16 the same run also times fp32 steps and
reports the speed-up (`--no-baseline` skips them). Both peaks are measured in every run.

The peak is the highest sustained rate of back-to-back 2048^3 matmuls over 5-second windows, one
window before the steps and one after each (`--peak-window`). On a shared machine whose speed
drifts by 10-20% from second to second, the best single matmul catches bursts that no 20-second
step can hold, so the best step is compared with the best window rather than with the best
burst. The best burst (best of 5 single matmuls at each point) and the utilization against it
are reported too: `matmul_burst_gflops`, `mfu_vs_burst`.

    python benchmarks/train_step.py [--precision auto] [--steps 5] [--batch 4] [--checkpointing] [--compile] [--allocator system]
    python benchmarks/train_step.py --device cuda --precision bf16 --compile --no-baseline --peak-window 1   # on a GPU

Like the `imagetx` command, it restarts itself with tcmalloc or jemalloc preloaded when one is
installed (see imagetx/system/allocator.py); --allocator system measures with the C library's malloc.

--compile runs the loss through torch.compile (Inductor's fused C++ kernels on CPU), as
`imagetx train --set train.compile=true` does; its one-off compile time is reported apart.

--relative none|logits|rotary sets model.relative (ours, not the paper's). --compare-relative times
the step with each of the three in one run, in the chosen precision (no matmul peaks), and prints
their best seconds per step and their ratios to "none":

    python benchmarks/train_step.py --compare-relative [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import matmul_peak_gflops, peak_device_gb, peak_rss_mb, sustained_matmul_gflops, sync  # noqa: E402

from imagetx.model.config import RELATIVES  # noqa: E402


def training_step(nll, opt, x, cfg, precision, device) -> None:
    """One optimizer step on the bits/dim of x, in `precision`."""
    with precision.autocast(device):
        loss = nll(x).mean() / (cfg.num_dims * 0.6931471805599453)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    from imagetx import ImageTransformer, ModelConfig
    from imagetx.system.allocator import allocator_in_use, restart_with_fast_allocator, use_mmap_for_large_tensors
    from imagetx.system.precision import resolve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--no-baseline", action="store_true", help="with bf16: do not also time fp32 steps")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    ap.add_argument("--compile", action="store_true", help="torch.compile the loss (as train.compile=true)")
    ap.add_argument("--peak-window", type=float, default=5.0, help="seconds per sustained matmul peak window")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: the device the step and the peaks run on")
    ap.add_argument("--allocator", choices=("auto", "system"), default="auto",
                    help="auto: restart with tcmalloc or jemalloc preloaded when installed")
    ap.add_argument("--relative", choices=RELATIVES, default="none", help="model.relative (ours, not the paper's)")
    ap.add_argument("--compare-relative", action="store_true",
                    help="time none, logits and rotary in one run and print their ratios to none")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.allocator == "auto" and device.type == "cpu":
        restart_with_fast_allocator()
    if allocator_in_use() == "system":
        use_mmap_for_large_tensors()  # so glibc's peak resident set is the live tensors, not heap fragments
    precision = resolve(args.precision, device)
    torch.manual_seed(0)
    if args.compare_relative:
        print(json.dumps(compare_relative(args, device, precision), indent=2))
        return
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {name: [] for name in dtypes}
    bursts = {name: [] for name in dtypes}

    def measure_peaks():
        for name, dtype in dtypes.items():
            bursts[name].append(matmul_peak_gflops(dtype=dtype, device=device))
            peaks[name].append(sustained_matmul_gflops(seconds=args.peak_window, dtype=dtype, device=device))

    measure_peaks()
    cfg = ModelConfig(n_layers=args.layers, relative=args.relative)  # defaults = the published CIFAR-10 cat config
    model = ImageTransformer(cfg).to(device).train()
    model.set_activation_checkpointing(args.checkpointing)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)
    x = torch.randint(0, 256, (args.batch, *cfg.image_size, cfg.channels), device=device)
    tokens = args.batch * cfg.seq_len
    keys = 2 * cfg.block_length
    non_embedding = cfg.non_embedding_params() + model.head.weight.numel()
    model_flops = 6 * non_embedding * tokens + 12 * cfg.n_layers * cfg.d_model * keys * tokens

    nll = torch.compile(model.nll) if args.compile else model.nll

    def time_steps(p) -> tuple[float, list[float]]:
        t = time.perf_counter()
        training_step(nll, opt, x, cfg, p, device)  # warm-up (allocations, Adam state; compilation with --compile)
        sync(device)
        first = time.perf_counter() - t
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            training_step(nll, opt, x, cfg, p, device)
            sync(device)
            times.append(time.perf_counter() - t)
            measure_peaks()
        return first, times

    first_step, times = time_steps(precision)
    baseline = None
    if precision.bf16 and not args.no_baseline:
        baseline = time_steps(resolve("fp32", device))[1]
    peak, burst = max(peaks[precision.name]), max(bursts[precision.name])
    best = min(times)
    result = {
        "config": f"cifar10 cat: {cfg.n_layers} layers, d {cfg.d_model}, {cfg.n_heads} heads, d_ff {cfg.d_ff}, "
        f"local1d block {cfg.block_length}, dropout {cfg.dropout}, batch {args.batch}, relative {cfg.relative}",
        "precision": precision.describe(),
        "activation_checkpointing": args.checkpointing,
        "compile": args.compile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "allocator": allocator_in_use(),
        "first_step_seconds": round(first_step, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "non_embedding_parameters": non_embedding,
        "torch_threads": torch.get_num_threads(),
        "seconds_per_step": [round(t, 2) for t in times],
        "best_seconds_per_step": round(best, 2),
        "model_tflops_per_step": round(model_flops / 1e12, 3),
        "achieved_gflops": round(model_flops / best / 1e9, 1),
        "matmul_peak_gflops": round(peak, 1),
        "matmul_peak_samples": {k: [round(p, 1) for p in v] for k, v in peaks.items()},
        "mfu": round(model_flops / best / 1e9 / peak, 3),
        "matmul_burst_gflops": round(burst, 1),
        "mfu_vs_burst": round(model_flops / best / 1e9 / burst, 3),
        "matmul_peak_gflops_by_precision": {k: round(max(v), 1) for k, v in peaks.items()},
        "peak_rss_gb": round(peak_rss_mb() / 1024, 2),
        "peak_device_memory_gb": None if device.type == "cpu" else round(peak_device_gb(device), 2),
    }
    if baseline is not None:
        result["fp32_seconds_per_step"] = [round(t, 2) for t in baseline]
        result["fp32_mfu"] = round(model_flops / min(baseline) / 1e9 / max(peaks["fp32"]), 3)
        result["speedup_over_fp32"] = round(min(baseline) / best, 2)
    if result["allocator"] == "system":
        result["note"] = ("measured with glibc's malloc, which costs 10-15% here in page faults; install "
                          "libtcmalloc-minimal4 (or libjemalloc2) and the benchmark preloads it")
    print(json.dumps(result, indent=2))


def compare_relative(args, device, precision) -> dict:
    """Seconds per training step at the published CIFAR-10 config with each model.relative: the
    same input and seed for each, their steps interleaved (round after round: one step of each),
    so that a shared machine's drift falls on all three alike."""
    from imagetx import ImageTransformer, ModelConfig

    runs = {}
    for relative in RELATIVES:
        torch.manual_seed(0)
        cfg = ModelConfig(n_layers=args.layers, relative=relative)
        model = ImageTransformer(cfg).to(device).train()
        model.set_activation_checkpointing(args.checkpointing)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)
        nll = torch.compile(model.nll) if args.compile else model.nll
        runs[relative] = (nll, opt)
    x = torch.randint(0, 256, (args.batch, *cfg.image_size, cfg.channels), device=device)
    seconds = {relative: [] for relative in RELATIVES}
    for i in range(args.steps + 1):  # round 0 is the warm-up
        for relative, (nll, opt) in runs.items():
            t = time.perf_counter()
            training_step(nll, opt, x, cfg, precision, device)
            sync(device)
            if i:
                seconds[relative].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in seconds.items()}
    return {
        "config": f"cifar10 cat: {args.layers} layers, d 512, 4 heads, d_ff 2048, local1d block 256, "
        f"dropout 0.3, batch {args.batch}",
        "precision": precision.describe(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "seconds_per_step": {k: [round(t, 3) for t in v] for k, v in seconds.items()},
        "best_seconds_per_step": {k: round(v, 3) for k, v in best.items()},
        "ratio_to_none": {k: round(v / best["none"], 3) for k, v in best.items()},
    }


if __name__ == "__main__":
    main()
