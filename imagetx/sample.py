"""`imagetx sample`: draw images from a checkpoint with the cached decoder and write them out."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from imagetx import console
from imagetx.storage.weights import load_model, weights_problems
from imagetx.checks import (count_problems, label_problems, memory_problems, output_dir_problems,
                            output_file_problems, seed_problems, temperature_problems)
from imagetx.system.distributed import Dist, device_problems, distributed, gather_shards, shard
from imagetx.errors import ConfigError, raise_problems
from imagetx.storage.images import display_scale, fit, read_image, save_grid, save_npz, save_png
from imagetx.model.decoding import DEFAULT_WINDOW, compile_problems, decode_problems, decoder_name, for_decoding
from imagetx.system.precision import precision_problems
from imagetx.system.precision import resolve as resolve_precision


@dataclass
class SampleConfig:
    """What `imagetx sample` does: which checkpoint, how many images, where they go."""

    checkpoint: str | os.PathLike
    num: int = 16
    temperature: float = 1.0
    label: int | None = None  # class-conditional models: one class for all; None = a balanced spread
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    out: str | os.PathLike | None = "samples.png"  # grid PNG
    individual: str | os.PathLike | None = None  # directory: one PNG per image
    npz: str | os.PathLike | None = None  # uint8 (N, H, W, C) under "arr_0"
    prime: str | os.PathLike | None = None  # image whose top rows are kept
    prime_rows: int | None = None  # default: half the image
    use_cache: bool = True
    progress: bool = True
    precision: str = "auto"  # "auto" (bf16 where the hardware has it natively), "fp32" or "bf16"
    weights: str = "auto"  # "auto" (the moving average when the run kept one), "ema" or "trained" (storage.weights.weights_key)
    decode: str = "auto"  # "sequential", "parallel" or "auto" (model/decoding.py: the same images in each)
    window: int = DEFAULT_WINDOW  # positions per pass of parallel decoding
    compile: bool | None = None  # the static decoding step through torch.compile (None: on a GPU; model/decoding.py)

    def problems(self) -> list[str]:
        """Every problem with the arguments, one line each, checked before any work starts
        (outputs that cannot be written included)."""
        p = decode_problems(self.decode, self.window) + compile_problems(self.compile, self.use_cache)
        p += count_problems(self.num, "--num") + count_problems(self.batch_size, "--batch-size")
        p += temperature_problems(self.temperature)
        p += device_problems(self.device) + precision_problems(self.precision) + weights_problems(self.weights)
        if self.out is None and self.individual is None and self.npz is None:
            p.append("nothing to write: give --out, --individual or --npz")
        if self.prime_rows is not None and self.prime is None:
            p.append("--prime-rows needs --prime IMAGE")
        p += seed_problems(self.seed)
        for flag, path in (("--out", self.out), ("--npz", self.npz)):
            if path is not None:
                p += output_file_problems(path, flag)
        if self.individual is not None:
            p += output_dir_problems(self.individual, "--individual")
        return p


def labels_for(model, n: int, label: int | None) -> torch.Tensor | None:
    """Labels for n images: the given class for all, or a balanced spread over the classes."""
    raise_problems(label_problems(model.config, label))
    k = model.config.num_classes
    if not k:
        return None
    if label is None:
        return torch.arange(n) % k
    return torch.full((n,), label, dtype=torch.long)


def prime_tensors(model, path, rows: int | None, n: int):
    """Read a prime image (converted and resized to the model's format, with a notice) and the
    mask keeping its top `rows` rows: uint8 (n, H, W, C) and bool of the same shape."""
    cfg = model.config
    H, W = cfg.image_size
    image, notices = read_image(path, cfg.channels)
    for note in notices:
        console.note(note)
    if tuple(image.shape[:2]) != (H, W):
        console.note(f"{Path(path).name}: {image.shape[0]}x{image.shape[1]} centre-cropped and resized to {H}x{W}")
        image = fit(image, (H, W))
    rows = H // 2 if rows is None else rows
    if not 1 <= rows < H:
        raise ConfigError([f"--prime-rows must be in [1, {H - 1}] for {H}-row images, got {rows}"])
    prime = image.expand(n, H, W, cfg.channels).clone()
    mask = torch.zeros_like(prime, dtype=torch.bool)
    mask[:, :rows] = True
    return prime, mask


def draw(req: SampleConfig, ctx: Dist) -> tuple[torch.Tensor, dict]:
    """Sample req.num images: under torchrun each process draws its share (distributed.shard) in
    batches of req.batch_size, and the shares are gathered. Image i's randomness is a function of
    req.seed and i alone (ImageTransformer.sample's first_index), so the images do not depend on
    the number of processes or on the batch size.

    -> (images uint8 (num, H, W, C) on the CPU, on every process; a summary: checkpoint,
    images, labels, timing). Nothing is written."""
    model = load_model(req.checkpoint, device=ctx.device, weights=req.weights)
    cfg = model.config
    if cfg.source_size is not None:
        raise ConfigError(["this is a super-resolution model: use `imagetx superres` with low-resolution inputs"])
    # all images are kept until every one is drawn, then written
    raise_problems(memory_problems(req.num * cfg.num_dims, f"{req.num} images of {cfg.num_dims} bytes", "--num"))
    labels = labels_for(model, req.num, req.label)
    prime = mask = None
    if req.prime is not None:
        prime, mask = prime_tensors(model, req.prime, req.prime_rows, req.num)
    precision = resolve_precision(req.precision, ctx.device)
    mine = shard(req.num, ctx.rank, ctx.world_size)  # global image indices
    batches = [mine[i : i + req.batch_size] for i in range(0, len(mine), req.batch_size)]
    decoder = for_decoding(model, precision.dtype, max(1, min(req.batch_size, len(mine))))
    name = decoder_name(decoder, req.use_cache, req.compile)  # raises ConfigError where --compile does not apply
    bar = console.progress(len(batches) * cfg.seq_len, "sampling", "pos", enabled=req.progress and ctx.is_main)
    H, W = cfg.image_size
    images = [torch.zeros(0, H, W, cfg.channels, dtype=torch.uint8, device=ctx.device)]  # a share may be empty
    start = time.perf_counter()
    try:
        for idx in batches:
            sl = slice(idx.start, idx.stop)
            images.append(decoder.sample(
                len(idx),
                labels=None if labels is None else labels[sl].to(ctx.device),
                temperature=float(req.temperature),
                seed=req.seed,
                first_index=idx.start,
                use_cache=req.use_cache,
                prime=None if prime is None else prime[sl],
                prime_mask=None if mask is None else mask[sl],
                progress=lambda done, total: bar.update(1),
                decode=req.decode if req.use_cache else "sequential",
                window=req.window,
                compile=req.compile,
            ))
    finally:
        bar.close()
    # on the device: NCCL gathers CUDA tensors
    images = gather_shards(torch.cat(images), req.num).cpu()
    seconds = time.perf_counter() - start
    summary = {
        "checkpoint": str(req.checkpoint),
        "images": int(images.shape[0]),
        "image_size": list(cfg.image_size),
        "channels": cfg.channels,
        "temperature": float(req.temperature),
        "seed": req.seed,
        "precision": precision.name,
        "decoder": name,
        "labels": None if labels is None else labels.tolist(),
        "processes": ctx.world_size,
        "seconds": round(seconds, 3),
        "ms_per_position": round(1000 * seconds / (max(1, len(batches)) * cfg.seq_len), 4),
    }
    return images, summary


def write(req: SampleConfig, images: torch.Tensor, image_size: tuple[int, int]) -> list[str]:
    """Write the grid, the individual PNGs and the npz that req asks for, each file atomically;
    -> the paths written."""
    written = []
    if req.out is not None:
        written.append(str(save_grid(images, req.out, scale=display_scale(image_size))))
    if req.individual is not None:
        d = Path(req.individual)
        d.mkdir(parents=True, exist_ok=True)
        width = len(str(req.num - 1))
        for i, image in enumerate(images):
            written.append(str(save_png(image, d / f"sample-{i:0{width}d}.png")))
    if req.npz is not None:
        written.append(str(save_npz(images, req.npz)))
    return written


def run(req: SampleConfig) -> dict:
    """Sample req.num images and write them; returns a summary (paths, timing). Raises
    ConfigError listing req.problems() before any work. Under torchrun the processes share the
    sampling (see draw) and the main process alone writes; the others return "written": []."""
    raise_problems(req.problems())
    with distributed(req.device) as ctx:
        images, summary = draw(req, ctx)
        # Everything is sampled before anything is written, and each file is written atomically.
        written = write(req, images, tuple(summary["image_size"])) if ctx.is_main else []
    return {**summary, "written": written}
