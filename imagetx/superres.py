"""`imagetx superres`: upscale low-resolution images with an encoder-decoder checkpoint.

Inputs are image files (converted and fitted to the model's source size, with a notice) or
held-out images of a data set, whose low-resolution versions are made exactly as in training,
so the ground truth can be shown and scored. K samples per input are drawn with the cached
decoder; one PNG per sample and one comparison grid are written to the output directory after
all sampling is done. With `report`, each input gets (see imagetx.training.metrics): the conditional
bits/dim of its ground truth, the consistency of its samples with it, and the PSNR of the samples
(averaged over the K samples) and of the bicubic upscale against the ground truth. With
`consistent`, every sample area-downsamples exactly to its input (AreaConsistency); with both
`consistent` and `report` the unrestricted samples are drawn too, from the same seed, scored
beside them and shown first in the comparison grid.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagetx import console
from imagetx.system.atomic import atomic_write
from imagetx.config import stored_config
from imagetx.storage.checkpoint import load_checkpoint, resolve_checkpoint
from imagetx.storage.weights import model_from_checkpoint, weights_problems
from imagetx.checks import (count_problems, label_problems, memory_problems, output_dir_problems, seed_problems,
                            temperature_problems)
from imagetx.system.distributed import Dist, device_problems, distributed, gather_shards, ranks, shard
from imagetx.errors import ConfigError, ImageFileError, RunError, raise_problems
from imagetx.model.consistency import AreaConsistency, factors
from imagetx.model.decoding import DEFAULT_WINDOW, compile_problems, decode_problems, decoder_name, for_decoding
from imagetx.system.precision import precision_problems
from imagetx.system.precision import resolve as resolve_precision
from imagetx.storage.images import IMAGE_SUFFIXES, comparison_grid, fit, list_images, png_bytes, read_image, to_pil
from imagetx.training.metrics import compute_metrics


@dataclass
class SuperResConfig:
    """What `imagetx superres` does: which checkpoint, which inputs, how many samples, where."""

    checkpoint: str | os.PathLike
    inputs: str | os.PathLike | None = None  # an image file or a directory of images
    dataset: str | None = None  # or held-out images of a data set (ground truth known)
    data_dir: str | None = None
    split: str = "test"
    num: int = 8  # dataset inputs: the first `num` images of the split
    samples: int = 1  # super-resolutions per input
    temperature: float = 0.9  # the paper's human-evaluation setting; 0 = greedy
    label: int | None = None  # class-conditional models with file inputs
    seed: int = 0
    batch_size: int = 16  # sequences decoded together (inputs x samples)
    device: str = "auto"
    out: str | os.PathLike = "superres"  # directory
    report: bool = False
    progress: bool = True
    precision: str = "auto"  # sampling: "auto" (bf16 where native), "fp32" or "bf16"; the report's bits/dim stay fp32
    consistent: bool = False  # every sample area-downsamples exactly to its input (AreaConsistency)
    weights: str = "auto"  # "auto" (the moving average when the run kept one), "ema" or "trained" (storage.weights.weights_key)
    decode: str = "auto"  # "sequential", "parallel" or "auto" (model/decoding.py: the same samples in each)
    window: int = DEFAULT_WINDOW  # positions per pass of parallel decoding
    compile: bool | None = None  # the static decoding step through torch.compile (None: on a GPU; model/decoding.py)

    def problems(self) -> list[str]:
        """Every problem with the arguments, one line each, checked before any work starts."""
        p = []
        if (self.inputs is None) == (self.dataset is None):
            p.append("give either --input FILE_OR_DIR or --dataset NAME (exactly one)")
        if self.inputs is not None and not Path(self.inputs).exists():
            p.append(f"--input {self.inputs}: no such file or directory")
        if self.data_dir is not None and self.dataset is None:
            p.append("--data-dir needs --dataset NAME")
        if self.dataset is not None:
            p += count_problems(self.num, "-n/--num")
        p += count_problems(self.samples, "--samples") + count_problems(self.batch_size, "--batch-size")
        p += temperature_problems(self.temperature)
        p += device_problems(self.device) + precision_problems(self.precision) + weights_problems(self.weights)
        p += seed_problems(self.seed) + decode_problems(self.decode, self.window) + compile_problems(self.compile)
        if self.out is None:
            p.append("--out DIR is required")
        else:
            p += output_dir_problems(self.out, "--out")
        return p


@dataclass
class LowRes:
    """One input: name (file stem or "test-00012"), source uint8 (h, w, C), the ground truth
    uint8 (H, W, C) when known, and its class label (None for unconditional models)."""

    name: str
    source: torch.Tensor
    target: torch.Tensor | None = None
    label: int | None = None


# ---- inputs ---------------------------------------------------------------------------------------
def read_source(path: str | os.PathLike, source_size: tuple[int, int], channels: int,
                notify: Callable[[str], None] = console.note) -> torch.Tensor:
    """An image file -> uint8 (h, w, channels) at the model's source size: mode converted and
    other sizes centre-cropped and area-resized, each with a notice. Raises ImageFileError for
    an unreadable file or an image smaller than the source size."""
    path = Path(path)
    image, notices = read_image(path, channels)
    for note in notices:
        notify(note)
    return fit_source(image, str(path), source_size, notify)


def fit_source(image: torch.Tensor, name: str, source_size: tuple[int, int],
               notify: Callable[[str], None] = console.note) -> torch.Tensor:
    """uint8 (H, W, C) read from `name` -> (h, w, C) at the model's source size: other sizes
    centre-cropped and area-resized, with a notice. Raises ImageFileError for an image smaller
    than the source size."""
    (H, W), (h, w) = image.shape[:2], source_size
    if H < h or W < w:
        raise ImageFileError(f"{name}: {H}x{W} is smaller than the model's {h}x{w} input size")
    if (H, W) != (h, w):
        notify(f"{Path(name).name}: {H}x{W} centre-cropped and area-resized to the model's {h}x{w} input size")
        image = fit(image, (h, w))
    return image


def _names(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique when two files share one (a.png, a.jpg -> a-png, a-jpg)."""
    stems = [p.stem for p in paths]
    return [f"{p.stem}-{p.suffix.lstrip('.').lower()}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def load_file_inputs(path: str | os.PathLike, cfg, label: int | None = None,
                     notify: Callable[[str], None] = console.note) -> tuple[list[LowRes], list[dict]]:
    """One image file, or every image directly inside a directory -> (inputs, failures).

    A file that cannot be used is reported on stderr and listed in failures as
    {"file", "error"}; the others are still used. Raises ConfigError for a directory without
    images and RunError when no input could be used."""
    path = Path(path)
    if path.is_dir():
        files = list_images(path)
        others = sorted(p.name for p in path.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            notify(f"{path}: ignoring {len(others)} file(s) without an image suffix ({shown})")
        if not files:
            raise ConfigError([f"--input {path}: no image files in this directory ({', '.join(IMAGE_SUFFIXES)})"])
    else:
        files = [path]
    inputs, failures = [], []
    for file, name in zip(files, _names(files)):
        try:
            source = read_source(file, cfg.source_size, cfg.channels, notify)
        except ImageFileError as exc:
            message = str(exc)
            error = message[len(f"{file}: "):] if message.startswith(f"{file}: ") else message
            console.warn(f"skipping {message}")
            failures.append({"file": str(file), "error": error})
            continue
        inputs.append(LowRes(name, source, None, label))
    if not inputs:
        if len(files) == 1:
            raise RunError(f"{failures[0]['file']}: {failures[0]['error']}")
        raise RunError(f"none of the {len(files)} images in {path} could be used (first: "
                       f"{Path(failures[0]['file']).name}: {failures[0]['error']})")
    return inputs, failures


def load_dataset_inputs(cfg, data, split: str, num: int, notify: Callable[[str], None] = console.note) -> list[LowRes]:
    """The first `num` images of a split as inputs named "test-00012", each low-resolution
    source made exactly as in training (area downsampling, or the CelebA protocol) and its
    ground truth kept. Raises DatasetError (from imagetx.data) or RunError."""
    from imagetx.data.batches import dataset_for

    dataset = dataset_for(cfg, data, split, download=False)
    n = len(dataset)
    if n == 0:
        raise RunError(f"the {split} split of {data.name} has no images")
    if num > n:
        notify(f"the {split} split of {data.name} has {n} images; using all of them, not {num}")
    width = max(5, len(str(n - 1)))
    inputs = []
    for i in range(min(num, n)):
        target, source, label = dataset[i]
        label = int(label) if cfg.num_classes else None
        inputs.append(LowRes(f"{split}-{i:0{width}d}", torch.as_tensor(source), torch.as_tensor(target), label))
    return inputs


# ---- sampling ---------------------------------------------------------------------------------------
def super_resolve(
    model,
    sources: torch.Tensor,
    samples: int = 1,
    labels: torch.Tensor | None = None,
    temperature: float = 0.9,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    consistent: bool = False,
    decode: str = "sequential",
    window: int = DEFAULT_WINDOW,
    watch: Callable[[int, int, torch.Tensor], None] | None = None,
    compile: bool | None = None,
) -> torch.Tensor:
    """sources uint8 (N, h, w, C) -> samples uint8 (N, K, H, W, C), K = samples, on the CPU.

    Each source is repeated K times and the N*K sequences are decoded batch_size at a time with
    the cached decoder (the encoder runs once per batch). Sequence j = i*K + k (input i, sample k)
    is global image j of ImageTransformer.sample: its randomness is a function of seed and j
    alone. Under torchrun each process decodes its share of the sequences (distributed.shard) and
    every process returns all of them. labels: long (N,) or None. consistent: draw each sub-pixel
    from the model's conditional restricted to the values that keep the image's area downsampling
    equal to its source (AreaConsistency). decode, window, compile: see decoding.generate (the
    same samples in every mode). watch: told each batch's images so far (ImageTransformer.sample)."""
    device = next(model.parameters()).device
    N = sources.shape[0]
    H, W = model.config.image_size
    rep_sources = sources.repeat_interleave(samples, dim=0)  # (N*K, h, w, C), input-major
    rep_labels = None if labels is None else labels.repeat_interleave(samples, dim=0)
    mine = shard(N * samples, *ranks())  # global sequence indices
    out = [torch.zeros(0, H, W, model.config.channels, dtype=torch.uint8, device=device)]  # a share may be empty
    for start in range(mine.start, mine.stop, batch_size):
        sl = slice(start, min(start + batch_size, mine.stop))
        constraint = None
        if consistent:
            constraint = AreaConsistency(rep_sources[sl].to(device), model.config.image_size,
                                         per_pixel=model.config.output == "dmol")
        try:
            images = model.sample(
                sl.stop - sl.start,
                labels=None if rep_labels is None else rep_labels[sl].to(device),
                source=rep_sources[sl].to(device),
                temperature=float(temperature),
                seed=seed,
                first_index=sl.start,
                progress=progress,
                constraint=constraint,
                decode=decode,
                window=window,
                watch=watch,
                compile=compile,
            )
        except ValueError as exc:  # the model names what does not fit
            raise RunError(f"the inputs do not fit the model: {exc}") from None
        out.append(images)
    # on the device: NCCL gathers CUDA tensors
    everything = gather_shards(torch.cat(out), N * samples).cpu()
    return everything.view(N, samples, H, W, model.config.channels)  # (N, K, H, W, C)


def upscale(sources: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    """uint8 (N, h, w, C) -> uint8 (N, H, W, C) with Pillow's "nearest" or "bicubic" filter."""
    resample = {"nearest": Image.Resampling.NEAREST, "bicubic": Image.Resampling.BICUBIC}[method]
    H, W = size
    out = []
    for s in sources:
        array = np.asarray(to_pil(s).resize((W, H), resample), dtype=np.uint8)
        out.append(torch.from_numpy(array.reshape(H, W, -1).copy()))
    return torch.stack(out)


# ---- outputs ------------------------------------------------------------------------------------------
def write_outputs(out: str | os.PathLike, names: Sequence[str], samples: torch.Tensor,
                  comparison: torch.Tensor) -> list[str]:
    """Write NAME-sample-K.png for every sample and comparison.png into out (created if needed).
    Every PNG is encoded first, then each file is written atomically."""
    out = Path(out)
    K = samples.shape[1]
    width = len(str(K - 1))
    files = [(out / f"{name}-sample-{k:0{width}d}.png", png_bytes(samples[i, k]))
             for i, name in enumerate(names) for k in range(K)]
    files.append((out / "comparison.png", png_bytes(comparison)))
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, data in files:
            written.append(str(atomic_write(path, data)))
    except OSError as exc:
        raise RunError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return written


def consistency_problems(cfg, ckpt, path) -> list[str]:
    """Why --consistent cannot hold this checkpoint's samples to their inputs (empty if it can):
    the source must be the area-downsampled target, with an integer factor on each side."""
    (H, W), (h, w) = cfg.image_size, cfg.source_size
    if factors(cfg.image_size, cfg.source_size) is None:
        return [f"--consistent needs the image size to be a multiple of the input size; this model makes "
                f"{H}x{W} from {h}x{w} ({path})"]
    data = stored_config(ckpt, path).get("data") or {}
    if data.get("celeba_protocol"):
        return [f"--consistent needs a model whose input is its target area-downsampled; this model was trained "
                f"on the CelebA protocol, whose input is cut from the larger native image ({path})"]
    return []


# ---- the command ----------------------------------------------------------------------------------------
def run(req: SuperResConfig) -> dict:
    """Super-resolve req's inputs and write the samples and a comparison grid; returns a summary:
    {"checkpoint", "inputs" (names), "samples_per_input", "temperature", "seed", "image_size",
    "source_size", "written", "failures", "consistent", "metrics" (None without report),
    "metrics_unrestricted" (with consistent and report: the unrestricted samples' metrics, else
    None), "seconds" (sampling)}. Under torchrun the processes share the sampling (super_resolve)
    and the main process alone scores and writes; the others return "written": [] and no metrics."""
    raise_problems(req.problems())
    with distributed(req.device) as ctx:
        return _run(req, ctx)


def _run(req: SuperResConfig, ctx: Dist) -> dict:
    device = ctx.device
    # notices about the inputs once, from the main process
    notify = console.note if ctx.is_main else (lambda message: None)
    path = resolve_checkpoint(req.checkpoint)
    ckpt = load_checkpoint(path, map_location=device)
    model = model_from_checkpoint(ckpt, path, device, req.weights).eval()
    cfg = model.config
    if cfg.source_size is None:
        raise ConfigError([f"this checkpoint is not a super-resolution model (no model.source_size): "
                           f"{path}; use `imagetx sample` for unconditional sampling"])
    raise_problems(label_problems(cfg, req.label, required=req.inputs is not None))
    if req.consistent:
        raise_problems(consistency_problems(cfg, ckpt, path))

    failures: list[dict] = []
    if req.inputs is not None:
        inputs, failures = load_file_inputs(req.inputs, cfg, req.label, notify)
    else:
        from imagetx.config import data_config_from_checkpoint

        data = data_config_from_checkpoint(ckpt, path, req.dataset, req.data_dir)
        inputs = load_dataset_inputs(cfg, data, req.split, req.num, notify)
    del ckpt
    sources = torch.stack([x.source for x in inputs])  # (N, h, w, C)
    labels = torch.tensor([x.label for x in inputs]) if cfg.num_classes else None

    total = len(inputs) * req.samples
    # every sample is kept until all are drawn, as in `imagetx sample`: a count no memory holds is a usage error
    raise_problems(memory_problems(total * cfg.num_dims, f"{total} samples of {cfg.num_dims} bytes", "--samples"))
    # --consistent --report also draws the unrestricted samples (same seed), to score both modes;
    # a model.consistent model has only one: its own distribution is the restricted one
    modes = [False, True] if req.consistent and req.report and not cfg.consistent else [req.consistent or cfg.consistent]
    passes = len(modes)
    mine = len(shard(total, ctx.rank, ctx.world_size))  # sequences this process decodes
    bar = console.progress(passes * math.ceil(mine / req.batch_size) * cfg.seq_len, "super-resolving", "pos",
                           enabled=req.progress and ctx.is_main)
    start = time.perf_counter()
    precision = resolve_precision(req.precision, device)
    decoder = for_decoding(model, precision.dtype, max(1, min(req.batch_size, mine)))
    for consistent in modes:  # --compile where a restricted draw keeps the eager decoder: ConfigError
        decoder_name(decoder, True, req.compile, restricted=consistent)
    drawn = {}
    try:
        for consistent in modes:
            drawn[consistent] = super_resolve(decoder, sources, req.samples, labels, req.temperature, req.seed,
                                              req.batch_size, progress=lambda done, steps: bar.update(1),
                                              consistent=consistent, decode=req.decode, window=req.window,
                                              compile=req.compile)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    samples = drawn[modes[-1]]
    if not ctx.is_main:  # the main process scores and writes
        return {"inputs": [x.name for x in inputs], "written": [], "failures": failures, "metrics": None,
                "metrics_unrestricted": None, "seconds": round(seconds, 3)}

    nearest = upscale(sources, cfg.image_size, "nearest")
    bicubic = upscale(sources, cfg.image_size, "bicubic")
    truth = [x.target for x in inputs]
    targets = torch.stack(truth) if all(t is not None for t in truth) else None
    metrics = unrestricted = None
    if req.report:
        metrics = compute_metrics(model, inputs, samples, bicubic, labels, req.batch_size)
        if len(modes) == 2:
            unrestricted = compute_metrics(model, inputs, drawn[False], bicubic, labels, req.batch_size)
    shown = torch.cat([drawn[m] for m in modes], dim=1)  # (N, K or 2K, H, W, C): unrestricted first
    written = write_outputs(req.out, [x.name for x in inputs], samples,
                            comparison_grid(nearest, bicubic, shown, targets))
    return {
        "checkpoint": str(path),
        "inputs": [x.name for x in inputs],
        "samples_per_input": req.samples,
        "temperature": float(req.temperature),
        "seed": req.seed,
        "precision": precision.name,
        "image_size": list(cfg.image_size),
        "source_size": list(cfg.source_size),
        "written": written,
        "failures": failures,
        "consistent": modes[-1],
        "metrics": metrics,
        "metrics_unrestricted": unrestricted,
        "seconds": round(seconds, 3),
    }
