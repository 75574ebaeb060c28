"""How attention cost grows with the image: 32x32x3 -> 64x64x3 (4x the positions).

Forward+backward time and peak memory of one attention layer (q/k/v/output projections and the
attention itself) for local 1D (block 256), local 2D (query (8, 32), flange (8, 32)), dense causal attention,
and local 1D computed through a dense (L, L) mask (the reference path every fast path is tested
against). Local patterns should grow about 4x (linear), dense about 16x. Each case runs
in its own process so its peak memory is its own.

    python benchmarks/attention_scaling.py [--batch 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import peak_rss_mb  # noqa: E402

PATTERNS = {
    "local1d": dict(attention="local1d", block_length=256),
    "local2d": dict(attention="local2d", query_shape=(8, 32), memory_flange=(8, 32)),
    "dense": dict(attention="full"),  # causal SDPA (flash kernel): quadratic time, linear memory
    "dense_mask": dict(attention="local1d", block_length=256),  # local 1D through a dense (L, L) mask
}
SIZES = {"32x32x3": (32, 32), "64x64x3": (64, 64)}


def run_case(pattern: str, size: str, batch: int, repeats: int) -> dict:
    from imagetx.system.allocator import use_mmap_for_large_tensors
    from imagetx import ImageTransformer, ModelConfig
    from imagetx.model import reference_mode

    use_mmap_for_large_tensors()
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=SIZES[size], n_layers=1, d_model=256, n_heads=4, d_ff=256, dropout=0.0, **PATTERNS[pattern])
    model = ImageTransformer(cfg)
    attn = model.blocks[0].attn
    mode = reference_mode if pattern == "dense_mask" else contextlib.nullcontext
    x = torch.randn(batch, model.layout.internal_len, cfg.d_model, requires_grad=True)
    windows = model.attention_windows(x)  # what the model's own forward pass would take
    base = peak_rss_mb()

    def step():
        with mode():
            out = attn(x, windows=windows)
            out.sum().backward()

    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"seconds": min(times), "peak_mb": peak_rss_mb() - base, "positions": cfg.seq_len}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", nargs=2, metavar=("PATTERN", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case, args.batch, args.repeats)))
        return
    results: dict = {"batch": args.batch, "torch_threads": torch.get_num_threads(), "patterns": {}}
    for pattern in PATTERNS:
        row = {}
        for size in SIZES:
            cmd = [sys.executable, __file__, "--case", pattern, size, "--batch", str(args.batch), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row[size] = json.loads(out.strip().splitlines()[-1])
        small, large = row["32x32x3"], row["64x64x3"]
        row["time_ratio"] = round(large["seconds"] / small["seconds"], 2)
        row["memory_ratio"] = round(large["peak_mb"] / max(small["peak_mb"], 1e-9), 2)
        results["patterns"][pattern] = row
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
