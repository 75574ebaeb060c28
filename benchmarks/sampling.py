"""Sampling speed at the published CIFAR-10 config (38M parameters, local 1D, block 256).

Reports, in one run on this machine:
- milliseconds per sub-pixel of the cached decoder at batch 1 and batch 16;
- the same step's roofline time from this machine's own measured memory bandwidth and matmul
  peak (weights read once per step; 2 FLOPs per weight per image plus the attention over the
  keys in the cache), and measured / roofline;
- the full-recompute reference path (`use_cache=False`, what the reference implementation does
  for every sub-pixel), timed on a prefix of steps, and its ratio to the cached decoder.
- optionally (--sizes) per sub-pixel time at 32x32x3 vs 64x64x3 for local 1D and local 2D.
- optionally (--static) the same for the static-shape step that `imagetx sample` takes on a GPU
  (imagetx/model/static.py: compiled with mode="reduce-overhead", one CUDA graph per step, its
  draw included), its speed-up over the eager step and its ratio to the roofline; eagerly on
  CPU, where sampling does not take it. --static-only skips the full-recompute path:

    python benchmarks/sampling.py --device cuda --batches 1,256 --static --static-only

--precision auto|fp32|bf16 picks the decoder's precision as `imagetx sample` does (auto: bf16 on
CPUs with AMX-BF16 or AVX512-BF16). The roofline counts 4 bytes per weight and cached key/value
in fp32, 2 in bf16, and the matmul peak of the same precision (both peaks are measured). When the
precision is bf16 the fp32 decoder is timed in the same run too, and the speed-up reported; on a
CPU where the fused C decoding step applies (imagetx/model/native), so is the bf16 decoder
through torch without it.

    python benchmarks/sampling.py [--precision auto] [--steps 256] [--slow-steps 3] [--sizes]
    python benchmarks/sampling.py --device cuda --batches 1,256    # on a GPU

--relative none|logits|rotary sets model.relative (ours, not the paper's). --compare-relative times
only the cached decoder, with each of the three in one run, at each batch size, and prints the
milliseconds per step and their ratios to "none":

    python benchmarks/sampling.py --compare-relative [--steps 256] [--batches 1,16]

--decode measures parallel (Jacobi) decoding against one position per step (imagetx sample
--decode). On a trained model (--model: a pretrained name, run directory or checkpoint; default
the packaged fashion-mnist) at temperature 1, batch 1: for each window of --windows, the passes
per image, the mean positions accepted per pass and the wall time against --decode sequential;
the fastest window is then timed at the other batch sizes. Each wall time is the fastest of
--rounds repetitions, the modes interleaved (other work on a shared machine only adds time).
Every measurement checks that the images equal sequential decoding's. At the published CIFAR-10 config, untrained: the cost of a
W-position pass relative to a one-position step, for each window. One run, one machine:

    python benchmarks/sampling.py --decode [--model fashion-mnist] [--images 8] [--windows 4,8,16,32,64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import matmul_peak_gflops, memory_bandwidth_gbs, sync  # noqa: E402

from imagetx.model.config import RELATIVES  # noqa: E402


def ms_per_step(step, steps: int, start: int, device) -> float:
    """Median-free honest timing: step(k) for k < start + 8 to reach the measured region (past
    the first block, say) and warm up, then the total time of `steps` consecutive steps / steps."""
    for k in range(start + 8):
        step(k)
    sync(device)
    t = time.perf_counter()
    for k in range(start + 8, start + 8 + steps):
        step(k)
    sync(device)
    return 1000 * (time.perf_counter() - t) / steps


def cached_ms_per_step(model, batch: int, steps: int, start: int = 0) -> float:
    """ms_per_step of the eager cached decoder (IncrementalDecoder), each value its argmax."""
    from imagetx.model.decoding import IncrementalDecoder

    with torch.inference_mode():
        dec = IncrementalDecoder(model, batch)
        prev = [None]

        def step(k):
            prev[0] = dec.step(k, prev[0]).float().argmax(-1)

        return ms_per_step(step, steps, start, next(model.parameters()).device)


def static_ms_per_step(model, batch: int, steps: int, start: int = 0) -> tuple[float, bool]:
    """ms_per_step of the static-shape step (imagetx/model/static.py) with its draw, through
    torch.compile(mode="reduce-overhead") on CUDA (a CUDA graph per step) where the machine can
    compile, as `imagetx sample` takes it there; eagerly elsewhere -> (ms, compiled). Its first
    calls compile and record, before the timing."""
    from imagetx.model.static import StaticDecoder

    device = next(model.parameters()).device
    with torch.inference_mode():
        dec = StaticDecoder(model, batch, temperature=1.0, seed=0).compiled(device.type == "cuda")
        ms = ms_per_step(dec.step, steps, start, device)
        run = dec.__dict__["run"]  # dec itself, or its CompiledOrEager (compiled until a build fails)
        return ms, run is not dec and run.compiled


def uncached_ms_per_step(model, steps: int, batch: int = 1) -> float:
    """The reference path: one full forward pass per sampled sub-pixel."""
    cfg = model.config
    x = torch.zeros(batch, *cfg.image_size, cfg.channels, dtype=torch.long, device=next(model.parameters()).device)
    with torch.inference_mode():
        model(x)
        sync(x.device)
        t = time.perf_counter()
        for _ in range(steps):
            model(x)
        sync(x.device)
        return 1000 * (time.perf_counter() - t) / steps


def roofline_ms(model, batch: int, bandwidth_gbs: float, peak_gflops: float, bytes_per_value: int = 4) -> dict:
    cfg = model.config
    weights = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("embed", "pos", "class_embed")))
    weight_bytes = bytes_per_value * weights
    keys = 2 * cfg.block_length if cfg.attention == "local1d" else cfg.seq_len
    flops = batch * (2 * weights + cfg.n_layers * 4 * keys * cfg.attn_dim)
    cache_bytes = batch * cfg.n_layers * 2 * keys * cfg.attn_dim * bytes_per_value  # K and V read once
    t_mem = (weight_bytes + cache_bytes) / (bandwidth_gbs * 1e9)
    t_flop = flops / (peak_gflops * 1e9)
    return {"ms": 1000 * max(t_mem, t_flop), "memory_ms": 1000 * t_mem, "compute_ms": 1000 * t_flop,
            "weight_mb": weight_bytes / 1e6}


def compare_relative(args, device, precision, batches) -> dict:
    """Milliseconds per cached decoder step at the published CIFAR-10 config with each
    model.relative, at each batch size (the same steps, past the first block, for each)."""
    from imagetx import ImageTransformer, ModelConfig
    from imagetx.model.decoding import for_decoding

    ms: dict = {}
    for relative in RELATIVES:
        torch.manual_seed(0)
        model = ImageTransformer(ModelConfig(dropout=0.0, relative=relative)).to(device).eval()
        for batch in batches:
            decoder = for_decoding(model, precision.dtype, batch)
            ms.setdefault(f"batch{batch}", {})[relative] = round(cached_ms_per_step(decoder, batch, args.steps, start=300), 3)
        del model
    return {
        "config": "cifar10 cat: 12 layers, d 512, 4 heads, d_ff 2048, local1d block 256",
        "precision": precision.describe(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "ms_per_subpixel_step": ms,
        "ratio_to_none": {b: {k: round(v / row["none"], 3) for k, v in row.items()} for b, row in ms.items()},
    }


def pass_cost_ratios(model, precision, device, windows, start: int, repeats: int = 30) -> dict:
    """Milliseconds of a W-position pass over the cache (IncrementalDecoder.steps from generation
    step `start`) / a one-position step, per W, at batch 1 in the sampling precision."""
    from imagetx.model.decoding import IncrementalDecoder, for_decoding

    model = for_decoding(model, precision.dtype, 1)
    labels = torch.zeros(1, dtype=torch.long, device=device) if model.config.num_classes else None
    ms = {}
    with torch.inference_mode():
        dec = IncrementalDecoder(model, 1, labels, window=max(windows))
        prev = None
        for k in range(start):
            prev = dec.step(k, prev).float().argmax(-1)
        values = torch.zeros(1, max(windows), dtype=torch.long, device=device)
        for W in [1, *windows]:
            for _ in range(3):  # warm up; a pass at the same k overwrites the same cache rows
                dec.steps(start, values[:, :W])
            sync(device)
            t = time.perf_counter()
            for _ in range(repeats):
                dec.steps(start, values[:, :W])
            sync(device)
            ms[W] = 1000 * (time.perf_counter() - t) / repeats
    return {"ms_one_position": round(ms[1], 3),
            "pass_over_one_position": {str(W): round(ms[W] / ms[1], 3) for W in windows}}


def decode_benchmark(args, device, precision) -> dict:
    """--decode: passes per image and wall time of parallel against sequential decoding on a
    trained model, and the cost of a W-position pass at the CIFAR-10 config."""
    from imagetx import load_model
    from imagetx.model import native
    from imagetx.model.decoding import IncrementalDecoder, for_decoding
    from imagetx.storage.checkpoint import resolve_checkpoint

    windows = [int(w) for w in args.windows.split(",")]
    model = load_model(args.model, device=device)
    cfg = model.config
    labels = (lambda n: torch.arange(n, device=device) % cfg.num_classes) if cfg.num_classes else (lambda n: None)
    passes = {"n": 0}
    real_steps = IncrementalDecoder.steps

    def counted(self, *a, **k):
        passes["n"] += 1
        return real_steps(self, *a, **k)

    def draw(batch: int, decode: str, window: int) -> tuple[torch.Tensor, float]:
        decoder = for_decoding(model, precision.dtype, batch)
        out, t = [], time.perf_counter()
        for first in range(0, args.images, batch):
            n = min(batch, args.images - first)
            out.append(decoder.sample(n, labels=labels(n), seed=0, first_index=first, decode=decode, window=window))
        return torch.cat(out), time.perf_counter() - t

    def parallel(batch: int, W: int) -> tuple[torch.Tensor, float, int]:
        passes["n"] = 0
        IncrementalDecoder.steps = counted
        try:
            images, seconds = draw(batch, "parallel", W)
        finally:
            IncrementalDecoder.steps = real_steps
        return images, seconds, passes["n"]

    draw(1, "sequential", 1)  # warm up: the fused library, the decoding copy
    # every measurement args.rounds times, the modes interleaved, the fastest kept: other work on
    # a shared machine only ever adds time, to whichever mode it happens to meet
    t_seq1, seconds, same, count = float("inf"), {W: float("inf") for W in windows}, {W: True for W in windows}, {}
    for _ in range(args.rounds):
        seq1, t = draw(1, "sequential", 1)
        t_seq1 = min(t_seq1, t)
        for W in windows:
            images, t, count[W] = parallel(1, W)
            seconds[W], same[W] = min(seconds[W], t), same[W] and bool(torch.equal(images, seq1))
    by_window = {}
    for W in windows:
        per_image = count[W] / args.images
        by_window[str(W)] = {"passes_per_image": round(per_image, 1),
                             "mean_accepted_per_pass": round(cfg.seq_len / per_image, 2),
                             "s_per_image": round(seconds[W] / args.images, 4),
                             "speedup_over_sequential": round(t_seq1 / seconds[W], 2),
                             "identical_images": same[W]}
    best = min(windows, key=lambda W: by_window[str(W)]["s_per_image"])  # the window measured fastest here
    timing = {"batch1": {"sequential_s_per_image": round(t_seq1 / args.images, 4),
                         "parallel_s_per_image": by_window[str(best)]["s_per_image"],
                         "parallel_speedup": by_window[str(best)]["speedup_over_sequential"],
                         "identical_images": by_window[str(best)]["identical_images"]}}
    for batch in [int(b) for b in args.batches.split(",") if int(b) != 1]:
        t_seq = t_par = float("inf")
        identical = True
        for _ in range(args.rounds):
            seq, t = draw(batch, "sequential", best)
            t_seq = min(t_seq, t)
            par, t, _ = parallel(batch, best)
            t_par, identical = min(t_par, t), identical and bool(torch.equal(seq, par))
        timing[f"batch{batch}"] = {"sequential_s_per_image": round(t_seq / args.images, 4),
                                   "parallel_s_per_image": round(t_par / args.images, 4),
                                   "parallel_speedup": round(t_seq / t_par, 2),
                                   "identical_images": identical}
    own_costs = pass_cost_ratios(model, precision, device, windows, start=cfg.seq_len // 3)
    from imagetx import ImageTransformer, ModelConfig

    torch.manual_seed(0)
    cifar10 = ImageTransformer(ModelConfig(dropout=0.0)).to(device).eval()  # the published CIFAR-10 config, untrained
    costs = pass_cost_ratios(cifar10, precision, device, windows, start=300)
    # is a one-position step bound by reading the weights? their bytes at this machine's copy bandwidth
    weight_mb = sum(p.numel() for p in cifar10.parameters()) * (2 if precision.bf16 else 4) / 1e6
    bandwidth = memory_bandwidth_gbs(device=device)
    costs.update(weight_mb=round(weight_mb, 1), memory_bandwidth_gbs=round(bandwidth, 1),
                 weights_at_bandwidth_ms=round(weight_mb / bandwidth, 3))
    return {
        "model": str(resolve_checkpoint(args.model)), "sub_pixels": cfg.seq_len, "images": args.images,
        "temperature": 1.0, "first_guess": "the sub-pixel above, then the last pass",
        "precision": precision.describe(), "decoder": "fused C step" if native.applies(for_decoding(model, precision.dtype, 1)) else "torch",
        "torch_threads": torch.get_num_threads(), "rounds": args.rounds, "batch1_by_window": by_window,
        "model_pass_cost": own_costs, "cifar10_config_pass_cost": costs, "window": best, "wall_time": timing,
    }


def main() -> None:
    from imagetx import ImageTransformer, ModelConfig
    from imagetx.model import native
    from imagetx.model.decoding import for_decoding
    from imagetx.system.precision import resolve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--steps", type=int, default=256, help="cached steps timed per batch size")
    ap.add_argument("--slow-steps", type=int, default=3, help="full-recompute steps timed")
    ap.add_argument("--sizes", action="store_true", help="also compare 32x32x3 with 64x64x3")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--batches", default="1,16", help="batch sizes of the cached decoder, comma-separated")
    ap.add_argument("--relative", choices=RELATIVES, default="none", help="model.relative (ours, not the paper's)")
    ap.add_argument("--compare-relative", action="store_true",
                    help="time the cached decoder with none, logits and rotary and print their ratios to none")
    ap.add_argument("--static", action="store_true",
                    help="also time the static-shape step (compiled to a CUDA graph on a GPU: see above)")
    ap.add_argument("--static-only", action="store_true",
                    help="with --static: the cached decoders only, not the full-recompute path")
    ap.add_argument("--decode", action="store_true", help="parallel against sequential decoding (see above)")
    ap.add_argument("--model", default="fashion-mnist", help="--decode: a pretrained name, run directory or checkpoint")
    ap.add_argument("--images", type=int, default=8, help="--decode: images drawn per measurement")
    ap.add_argument("--windows", default="4,8,16,32,64", help="--decode: window sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3,
                    help="--decode: times each measurement is repeated, the modes interleaved; the fastest is kept")
    args = ap.parse_args()
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    precision = resolve(args.precision, device)
    torch.manual_seed(0)
    if args.compare_relative:
        print(json.dumps(compare_relative(args, device, precision, batches), indent=2))
        return
    if args.decode:
        print(json.dumps(decode_benchmark(args, device, precision), indent=2))
        return
    bandwidth = memory_bandwidth_gbs(device=device)
    peaks = {name: matmul_peak_gflops(dtype=dtype, device=device) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    model = ImageTransformer(ModelConfig(dropout=0.0, relative=args.relative)).to(device).eval()  # published CIFAR-10 cat config
    result: dict = {
        "config": f"cifar10 cat: 12 layers, d 512, 4 heads, d_ff 2048, local1d block 256, relative {args.relative}",
        "precision": precision.describe(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "memory_bandwidth_gbs": round(bandwidth, 2),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
    }
    value_bytes = 2 if precision.bf16 else 4
    for batch in batches:
        decoder = for_decoding(model, precision.dtype, batch)
        fused = native.applies(decoder)
        result["decoder"] = "fused C step (imagetx/model/native)" if fused else "torch"
        ms = cached_ms_per_step(decoder, batch, args.steps, start=300)
        roof = roofline_ms(model, batch, bandwidth, peaks[precision.name], value_bytes)
        row = result[f"batch{batch}"] = {
            "ms_per_subpixel_step": round(ms, 3),
            "ms_per_image_subpixel": round(ms / batch, 3),
            "seconds_per_image": round(ms / batch * model.config.seq_len / 1000, 2),
            "roofline_ms": round(roof["ms"], 3),
            "roofline_memory_ms": round(roof["memory_ms"], 3),
            "roofline_compute_ms": round(roof["compute_ms"], 3),
            "measured_over_roofline": round(ms / roof["ms"], 2),
        }
        if precision.bf16:  # the fp32 decoder in the same run
            fp32 = cached_ms_per_step(model, batch, args.steps, start=300)
            row["fp32_ms_per_subpixel_step"] = round(fp32, 3)
            row["fp32_measured_over_fp32_roofline"] = round(fp32 / roofline_ms(model, batch, bandwidth, peaks["fp32"])["ms"], 2)
            row["speedup_over_fp32"] = round(fp32 / ms, 2)
        if fused:  # the same bf16 decoder through torch, in the same run
            with native.turned_off():
                plain = cached_ms_per_step(for_decoding(model, precision.dtype, batch), batch, args.steps, start=300)
            row["torch_path_ms_per_subpixel_step"] = round(plain, 3)
            row["fused_speedup_over_torch_path"] = round(plain / ms, 2)
        if args.static:  # the static-shape step, its draw included (the eager step above has none)
            fixed, compiled = static_ms_per_step(decoder, batch, args.steps, start=300)
            row["static_ms_per_subpixel_step"] = round(fixed, 3)
            row["static_compiled"] = compiled
            row["static_measured_over_roofline"] = round(fixed / roof["ms"], 2)
            row["static_speedup_over_eager"] = round(ms / fixed, 2)
    if args.static_only:
        print(json.dumps(result, indent=2))
        return
    for batch, steps in ((batches[0], args.slow_steps), (batches[-1], 1)):
        slow = uncached_ms_per_step(model, steps, batch)
        result[f"batch{batch}"]["uncached_fp32_ms_per_subpixel_step"] = round(slow, 1)
        result[f"batch{batch}"]["cached_speedup"] = round(slow / result[f"batch{batch}"]["ms_per_subpixel_step"], 1)
    if args.sizes:
        sizes = {}
        for name, extra in {
            "local1d": dict(attention="local1d", block_length=256),
            "local2d": dict(attention="local2d", query_shape=(8, 32), memory_flange=(8, 32)),
        }.items():
            row = {}
            for hw in ((32, 32), (64, 64)):
                m = ImageTransformer(ModelConfig(image_size=hw, dropout=0.0, n_layers=4, **extra)).to(device).eval()
                row[f"{hw[0]}x{hw[1]}x3"] = round(cached_ms_per_step(for_decoding(m, precision.dtype), 1, args.steps, start=600), 3)
            row["ratio"] = round(row["64x64x3"] / row["32x32x3"], 3)
            sizes[name] = row
        result["ms_per_step_by_size_4_layers"] = sizes
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
