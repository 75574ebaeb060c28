"""The decoded-data cache under torchrun: each process's resident memory against the decoded data
set's size, the one-time conversion, and the loader's images/s with 0, 1 and 2 workers.

The data is synthetic but in the real format: downsampled ImageNet 64x64 as Chrabaszcz et al.
ship it (Imagenet64_train_npz/train_data_batch_K.npz, keys data (N, 12288) uint8 channel-major,
labels 1..1000, mean), --images of them (default 200,000: 2.46 GB decoded). Then:

1. conversion: one process loads the split with the cache on (decodes it into CACHE once);
2. training: `torchrun --nproc_per_node 2` (gloo, CPU) trains a small model on it for --steps
   steps; each process reports its resident memory before it loads the data, after every step
   (VmRSS, with the anonymous and file-backed parts: pages of the mapped array a process touched
   count as its file-backed RSS, but the page cache holds them once) and its peak (ru_maxrss);
   rss_growth_mb = the higher of the two last ones minus the first;
3. loader: images/s of random batches of --batch-images from the cached split, 0, 1, 2 workers.

Floor (the issue's): each process's resident memory grows by less than a quarter of the decoded
size. --compare-off also trains with data.cache_dir=off (every process decodes its own copy).

    python benchmarks/data_cache.py [--images 200000] [--steps 5] [--dir /tmp/imagetx-data-cache-bench] [--keep]

Prints one JSON object. The data and cache stay in --dir with --keep (a rerun reuses them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this source tree, whatever is installed
PER_FILE = 20_000  # images per train_data_batch_K.npz (the real files hold about 128,000)


def status_mb() -> dict:
    """This process's resident memory now, in MB: total, anonymous, file-backed (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def write_data(root: Path, n: int, size: int) -> float:
    """Synthetic Chrabaszcz npz files (train and val) -> seconds; reused when already there."""
    stamp = root / f"written-{n}-{size}"
    if stamp.exists():
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    train = root / f"Imagenet{size}_train_npz"
    val = root / f"Imagenet{size}_val_npz"
    train.mkdir(parents=True)
    val.mkdir()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for k, first in enumerate(range(0, n, PER_FILE), 1):
        count = min(PER_FILE, n - first)
        data = rng.integers(0, 256, (count, 3 * size * size), dtype=np.uint8)
        np.savez(train / f"train_data_batch_{k}.npz", data=data, labels=rng.integers(1, 1001, count),
                 mean=data.mean(0, dtype=np.float32))
    data = rng.integers(0, 256, (1000, 3 * size * size), dtype=np.uint8)
    np.savez(val / "val_data.npz", data=data, labels=rng.integers(1, 1001, 1000))
    stamp.touch()
    return time.perf_counter() - start


def open_cached(args):
    """The train split through the cache, asked for as training asks for it (the model's size and
    channels), so that all three phases use one cache entry."""
    from imagetx.data import load_dataset

    return load_dataset(f"imagenet{args.size}", args.dir / "data", "train", image_size=(args.size, args.size),
                        channels=3, cache_dir=args.dir / "cache")


def convert(args) -> None:
    """Role "convert": load the train split with the cache on; print seconds, peak RSS (which
    counts the pages of the output file it wrote through its mapping) and peak anonymous RSS
    (its own memory), sampled every 20 ms."""
    import threading

    peak_anon, done = [0.0], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], status_mb()["RssAnon"])

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    ds = open_cached(args)
    seconds = time.perf_counter() - start
    done.set()
    print(json.dumps({
        "seconds": round(seconds, 1),
        "images": len(ds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_anon_rss_mb": round(peak_anon[0]),
    }))


def train_rank(args) -> None:
    """Role "train" (one torchrun process): a few training steps with RSS recorded around them."""
    import imagetx.train as T
    from imagetx.config import load_config

    record = {"before_data": status_mb(), "steps": []}
    load_data, step = T.Trainer.load_data, T.Trainer.train_step

    def measured_load(self):
        record["before_data"] = status_mb()
        load_data(self)
        record["after_data"] = status_mb()

    def measured_step(self, stream):
        out = step(self, stream)
        record["steps"].append(status_mb())
        return out

    T.Trainer.load_data, T.Trainer.train_step = measured_load, measured_step
    rank = int(os.environ["RANK"])
    config = load_config(sets=[
        f"data.name=imagenet{args.size}", f"data.data_dir={args.dir / 'data'}",
        f"data.cache_dir={args.dir / 'cache' if args.cache else 'off'}",
        f"model.image_size=[{args.size}, {args.size}]", "model.channels=3", "model.attention=local1d",
        "model.block_length=256", "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
        "model.num_classes=0", "train.device=cpu", "train.precision=fp32", f"train.out={args.dir / 'run'}",
        "train.batch_size=4", f"train.max_steps={args.steps}", "train.eval_every=0", "train.sample_every=0",
        "train.checkpoint_every=0", "train.log_every=1", "train.max_minutes=0",
    ])
    T.run(config)
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (args.dir / f"rank{rank}-{'cache' if args.cache else 'off'}.json").write_text(json.dumps(record))


def torchrun(args, cache: bool) -> list[dict]:
    shutil.rmtree(args.dir / "run", ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--role", "train", "--dir", str(args.dir), "--size", str(args.size), "--steps", str(args.steps)]
    if not cache:
        cmd.append("--cache-off")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    seconds = time.perf_counter() - start
    out = []
    for rank in range(2):
        r = json.loads((args.dir / f"rank{rank}-{'cache' if cache else 'off'}.json").read_text())
        base = r["before_data"]["VmRSS"]
        high = max([r["after_data"]["VmRSS"]] + [s["VmRSS"] for s in r["steps"]])
        last = r["steps"][-1]
        out.append({
            "rank": rank,
            "rss_before_data_mb": round(base),
            "rss_max_at_steps_mb": round(high),
            "peak_rss_mb": round(r["peak_rss_mb"]),
            "rss_growth_mb": round(max(high, r["peak_rss_mb"]) - base),  # the peak inside a step counts
            "rss_last_step_mb": {k: round(v) for k, v in last.items()},
        })
    return [{"seconds": round(seconds, 1)}, *out]


def loader(args, workers: int) -> float:
    """images/s of random batches from the cached train split with `workers` DataLoader workers."""
    import torch

    from imagetx.data.batches import batches

    ds = open_cached(args)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: args.loader_images].tolist()
    lists = [perm[i : i + args.batch_images] for i in range(0, len(perm), args.batch_images)]
    it = batches(ds, iter(lists), num_workers=workers, seed=0)
    next(it)  # worker start-up is not throughput
    start, count = time.perf_counter(), 0
    for x, _ in it:
        count += len(x)
    return count / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=64, choices=(32, 64))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/imagetx-data-cache-bench"))
    ap.add_argument("--loader-images", type=int, default=20_000)
    ap.add_argument("--batch-images", type=int, default=64)
    ap.add_argument("--compare-off", action="store_true", help="also train with data.cache_dir=off")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic data and the cache in --dir")
    ap.add_argument("--role", choices=("main", "convert", "train"), default="main", help=argparse.SUPPRESS)
    ap.add_argument("--cache-off", dest="cache", action="store_false", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "convert":
        return convert(args)
    if args.role == "train":
        return train_rank(args)

    import torch

    decoded_mb = args.images * args.size * args.size * 3 / 2**20
    result = {
        "data": f"synthetic ImageNet {args.size}x{args.size}, Chrabaszcz et al. npz format",
        "images": args.images,
        "decoded_mb": round(decoded_mb),
        "torch": torch.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "write_npz_seconds": round(write_data(args.dir / "data", args.images, args.size), 1),
    }
    shutil.rmtree(args.dir / "cache", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--role", "convert", "--dir", str(args.dir), "--size", str(args.size)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"conversion failed:\n{proc.stderr[-4000:]}")
    result["conversion"] = json.loads(proc.stdout.splitlines()[-1])
    result["cache_entries"] = len([p for p in (args.dir / "cache").iterdir() if p.is_dir()])
    timing, *ranks = torchrun(args, cache=True)
    result["train_2_processes_cache"] = {"steps": args.steps, **timing, "ranks": ranks}
    floor = decoded_mb / 4
    result["floor_rss_growth_mb"] = round(floor)
    result["floor_met"] = all(r["rss_growth_mb"] < floor for r in ranks)
    if args.compare_off:
        timing, *ranks = torchrun(args, cache=False)
        result["train_2_processes_cache_off"] = {"steps": args.steps, **timing, "ranks": ranks}
    result["loader_images_per_s"] = {str(w): round(loader(args, w)) for w in (0, 1, 2)}
    result["loader_batch"] = args.batch_images
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
