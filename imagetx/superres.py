"""`imagetx superres`: upscale low-resolution images with an encoder-decoder checkpoint.

Inputs are image files (converted and fitted to the model's source size, with a notice) or
held-out images of a data set, whose low-resolution versions are made exactly as in training,
so the ground truth can be shown and scored. K samples per input are drawn with the cached
decoder; one PNG per sample and one comparison grid are written to the output directory after
all sampling is done. With `report`, each input gets:

- bpd: conditional bits/dim of the ground truth, nll(target | source) / (H*W*C ln 2);
- consistency: mean |area_downsample(sample) - source| in 0-255 units (0 = the sample explains
  its input exactly), averaged over the K samples;
- psnr, psnr_bicubic: 10 log10(255^2 / MSE) in dB of each sample (averaged over the K samples)
  and of the bicubic upscale against the ground truth. Identical images would score infinity;
  they score PSNR_CAP instead so averages and JSON stay finite.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagetx.checkpoint import atomic_write, load_checkpoint, model_from_checkpoint, resolve_checkpoint
from imagetx.distributed import select_device
from imagetx.errors import ConfigError, RunError
from imagetx.images import IMAGE_SUFFIXES, ImageFileError, fit, grid, list_images, png_bytes, read_image, to_pil

LN2 = math.log(2.0)
PSNR_CAP = 100.0  # dB reported for identical images (MSE = 0)


@dataclass
class SuperResRequest:
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


@dataclass
class LowRes:
    """One input: name (file stem or "test-00012"), source uint8 (h, w, C), the ground truth
    uint8 (H, W, C) when known, and its class label (None for unconditional models)."""

    name: str
    source: torch.Tensor
    target: torch.Tensor | None = None
    label: int | None = None


def _notify(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---- checks ---------------------------------------------------------------------------------------
def _check_request(req: SuperResRequest) -> None:
    problems = []
    if (req.inputs is None) == (req.dataset is None):
        problems.append("give either --input FILE_OR_DIR or --dataset NAME (exactly one)")
    if req.inputs is not None and not Path(req.inputs).exists():
        problems.append(f"--input {req.inputs}: no such file or directory")
    if req.data_dir is not None and req.dataset is None:
        problems.append("--data-dir needs --dataset NAME")
    if req.dataset is not None and (not isinstance(req.num, int) or req.num < 1):
        problems.append(f"-n/--num must be >= 1, got {req.num}")
    if not isinstance(req.samples, int) or req.samples < 1:
        problems.append(f"--samples must be >= 1, got {req.samples}")
    if not isinstance(req.batch_size, int) or req.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {req.batch_size}")
    t = req.temperature
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        problems.append(f"--temperature must be a finite number >= 0 (0 = greedy), got {t}")
    if req.out is None:
        problems.append("--out DIR is required")
    if problems:
        raise ConfigError(problems)


def check_out_dir(out: str | os.PathLike) -> None:
    """Fail before sampling, not after, when the output directory cannot be created or written.
    Creates nothing: the directory is made only when there is something to write."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ConfigError([f"--out {out} exists and is not a directory"])
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError([f"output directory {out} is not writable"])
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError([f"cannot create output directory {out}: {parent} is not a writable directory"])


def _check_label(cfg, label: int | None, from_files: bool) -> None:
    if not cfg.num_classes:
        if label is not None:
            raise ConfigError(["--label given, but this model is not class-conditional"])
        return
    if label is None and from_files:
        raise ConfigError(
            [f"this super-resolution model is class-conditional: give --label in [0, {cfg.num_classes - 1}]"]
        )
    if label is not None and not 0 <= label < cfg.num_classes:
        raise ConfigError([f"--label must be in [0, {cfg.num_classes - 1}] for this model, got {label}"])


# ---- inputs ---------------------------------------------------------------------------------------
def read_source(path: str | os.PathLike, source_size: tuple[int, int], channels: int,
                notify: Callable[[str], None] = _notify) -> torch.Tensor:
    """An image file -> uint8 (h, w, channels) at the model's source size: mode converted and
    other sizes centre-cropped and area-resized, each with a notice. Raises ImageFileError for
    an unreadable file or an image smaller than the source size."""
    path = Path(path)
    image, notices = read_image(path, channels)
    for note in notices:
        notify(note)
    (H, W), (h, w) = image.shape[:2], source_size
    if H < h or W < w:
        raise ImageFileError(f"{path}: {H}x{W} is smaller than the model's {h}x{w} input size")
    if (H, W) != (h, w):
        notify(f"{path.name}: {H}x{W} centre-cropped and area-resized to the model's {h}x{w} input size")
        image = fit(image, (h, w))
    return image


def _names(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique when two files share one (a.png, a.jpg -> a-png, a-jpg)."""
    stems = [p.stem for p in paths]
    return [f"{p.stem}-{p.suffix.lstrip('.').lower()}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def load_file_inputs(path: str | os.PathLike, cfg, label: int | None = None,
                     notify: Callable[[str], None] = _notify) -> tuple[list[LowRes], list[dict]]:
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
            _warn(f"skipping {message}")
            failures.append({"file": str(file), "error": error})
            continue
        inputs.append(LowRes(name, source, None, label))
    if not inputs:
        if len(files) == 1:
            raise RunError(f"{failures[0]['file']}: {failures[0]['error']}")
        raise RunError(f"none of the {len(files)} images in {path} could be used (first: "
                       f"{Path(failures[0]['file']).name}: {failures[0]['error']})")
    return inputs, failures


def load_dataset_inputs(cfg, data, split: str, num: int, notify: Callable[[str], None] = _notify) -> list[LowRes]:
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
    generator: torch.Generator | None = None,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """sources uint8 (N, h, w, C) -> samples uint8 (N, K, H, W, C), K = samples.

    Each source is repeated K times and the N*K sequences are decoded batch_size at a time with
    the cached decoder (the encoder runs once per batch). labels: long (N,) or None."""
    device = next(model.parameters()).device
    N = sources.shape[0]
    rep_sources = sources.repeat_interleave(samples, dim=0)  # (N*K, h, w, C), input-major
    rep_labels = None if labels is None else labels.repeat_interleave(samples, dim=0)
    out = []
    for start in range(0, N * samples, batch_size):
        sl = slice(start, min(start + batch_size, N * samples))
        try:
            images = model.sample(
                sl.stop - sl.start,
                labels=None if rep_labels is None else rep_labels[sl].to(device),
                source=rep_sources[sl].to(device),
                temperature=float(temperature),
                generator=generator,
                progress=progress,
            )
        except ValueError as exc:  # the model names what does not fit
            raise RunError(f"the inputs do not fit the model: {exc}") from None
        out.append(images.cpu())
    H, W = model.config.image_size
    return torch.cat(out).view(N, samples, H, W, model.config.channels)  # (N, K, H, W, C)


def upscale(sources: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    """uint8 (N, h, w, C) -> uint8 (N, H, W, C) with Pillow's "nearest" or "bicubic" filter."""
    resample = {"nearest": Image.Resampling.NEAREST, "bicubic": Image.Resampling.BICUBIC}[method]
    H, W = size
    out = []
    for s in sources:
        array = np.asarray(to_pil(s).resize((W, H), resample), dtype=np.uint8)
        out.append(torch.from_numpy(array.reshape(H, W, -1).copy()))
    return torch.stack(out)


# ---- metrics ------------------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, C) pairs -> float64 (...) PSNR in dB for 8-bit peak 255; PSNR_CAP where
    the images are identical."""
    mse = (a.double() - b.double()).pow(2).flatten(-3).mean(-1)
    value = 10 * torch.log10(255.0**2 / mse)  # inf where mse == 0
    return value.clamp(max=PSNR_CAP)


def consistency(samples: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """samples uint8 (N, K, H, W, C), sources uint8 (N, h, w, C) -> float64 (N, K): mean
    absolute difference (0-255 units) between each area-downsampled sample and its source."""
    from imagetx.data.transforms import area_downsample

    N, K, H, W, C = samples.shape
    small = area_downsample(samples.reshape(N * K, H, W, C), tuple(sources.shape[1:3]))
    small = small.view(N, K, *sources.shape[1:])  # (N, K, h, w, C)
    return (small.double() - sources[:, None].double()).abs().flatten(2).mean(-1)


@torch.inference_mode()
def conditional_bpd(model, targets: torch.Tensor, sources: torch.Tensor, labels: torch.Tensor | None = None,
                    batch_size: int = 16) -> torch.Tensor:
    """targets uint8 (N, H, W, C), sources uint8 (N, h, w, C) -> float64 (N,) bits/dim of each
    target under the model given its source: nll / (H*W*C ln 2)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, targets.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        nll = model.nll(targets[sl].to(device), labels=None if labels is None else labels[sl].to(device),
                        source=sources[sl].to(device))  # (B,) nats
        out.append(nll.double().cpu())
    return torch.cat(out) / (model.config.num_dims * LN2)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def compute_metrics(model, inputs: Sequence[LowRes], samples: torch.Tensor, bicubic: torch.Tensor,
                    labels: torch.Tensor | None = None, batch_size: int = 16) -> dict:
    """Per-input and mean metrics (see the module docstring). samples uint8 (N, K, H, W, C),
    bicubic uint8 (N, H, W, C). Metrics needing the ground truth are None for file inputs.
    -> {"per_input": [{"input", "bpd", "consistency", "psnr", "psnr_samples", "psnr_bicubic"}],
        "mean": {"bpd", "consistency", "psnr", "psnr_bicubic"}, "psnr_cap": PSNR_CAP}"""
    sources = torch.stack([x.source for x in inputs])
    cons = consistency(samples, sources)  # (N, K)
    known = [i for i, x in enumerate(inputs) if x.target is not None]
    bpd = {}
    psnr_s, psnr_b = {}, {}
    if known:
        targets = torch.stack([inputs[i].target for i in known])
        idx = torch.tensor(known)
        bpd = dict(zip(known, conditional_bpd(model, targets, sources[idx],
                                              None if labels is None else labels[idx], batch_size).tolist()))
        psnr_s = dict(zip(known, psnr(samples[idx], targets[:, None]).tolist()))  # (n, K)
        psnr_b = dict(zip(known, psnr(bicubic[idx], targets).tolist()))
    rows = []
    for i, x in enumerate(inputs):
        rows.append({
            "input": x.name,
            "bpd": bpd.get(i),
            "consistency": float(cons[i].mean()),
            "psnr": _mean(psnr_s[i]) if i in psnr_s else None,
            "psnr_samples": psnr_s.get(i),
            "psnr_bicubic": psnr_b.get(i),
        })
    mean = {k: _mean([r[k] for r in rows]) for k in ("bpd", "consistency", "psnr", "psnr_bicubic")}
    return {"per_input": rows, "mean": mean, "psnr_cap": PSNR_CAP}


# ---- outputs ------------------------------------------------------------------------------------------
def comparison_grid(nearest: torch.Tensor, bicubic: torch.Tensor, samples: torch.Tensor,
                    targets: torch.Tensor | None = None) -> torch.Tensor:
    """One row per input: nearest-neighbour enlargement, bicubic, the K samples, the ground truth
    (when known) -> uint8 (H', W', C). nearest, bicubic, targets: (N, H, W, C); samples (N, K, H, W, C)."""
    columns = [nearest[:, None], bicubic[:, None], samples]
    if targets is not None:
        columns.append(targets[:, None])
    rows = torch.cat(columns, dim=1)  # (N, 2 + K (+1), H, W, C)
    N, cols = rows.shape[:2]
    return grid(rows.reshape(N * cols, *rows.shape[2:]), nrow=cols, scale=_scale(tuple(rows.shape[2:4])))


def _scale(size: tuple[int, int]) -> int:
    """Enlarge small images in grids so they can be seen (16x16 -> 4x, 32x32 -> 2x)."""
    return max(1, 64 // max(size))


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


# ---- the command ----------------------------------------------------------------------------------------
def run(req: SuperResRequest) -> dict:
    """Super-resolve req's inputs and write the samples and a comparison grid; returns a summary:
    {"checkpoint", "inputs" (names), "samples_per_input", "temperature", "seed", "image_size",
    "source_size", "written", "failures", "metrics" (None without report), "seconds" (sampling)}."""
    from tqdm import tqdm

    _check_request(req)
    check_out_dir(req.out)
    device = select_device(req.device)
    path = resolve_checkpoint(req.checkpoint)
    ckpt = load_checkpoint(path, map_location=device)
    model = model_from_checkpoint(ckpt, path, device).eval()
    cfg = model.config
    if cfg.source_size is None:
        raise ConfigError([f"this checkpoint is not a super-resolution model (no model.source_size): "
                           f"{path}; use `imagetx sample` for unconditional sampling"])
    _check_label(cfg, req.label, from_files=req.inputs is not None)

    failures: list[dict] = []
    if req.inputs is not None:
        inputs, failures = load_file_inputs(req.inputs, cfg, req.label)
    else:
        from imagetx.data.batches import data_config_from_checkpoint

        data = data_config_from_checkpoint(ckpt, path, req.dataset, req.data_dir)
        inputs = load_dataset_inputs(cfg, data, req.split, req.num)
    del ckpt
    sources = torch.stack([x.source for x in inputs])  # (N, h, w, C)
    labels = torch.tensor([x.label for x in inputs]) if cfg.num_classes else None

    generator = torch.Generator(device=device).manual_seed(req.seed)
    total = len(inputs) * req.samples
    bar = tqdm(total=math.ceil(total / req.batch_size) * cfg.seq_len, unit="pos", desc="super-resolving",
               file=sys.stderr, disable=not req.progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        samples = super_resolve(model, sources, req.samples, labels, req.temperature, generator,
                                req.batch_size, progress=lambda done, steps: bar.update(1))
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    nearest = upscale(sources, cfg.image_size, "nearest")
    bicubic = upscale(sources, cfg.image_size, "bicubic")
    truth = [x.target for x in inputs]
    targets = torch.stack(truth) if all(t is not None for t in truth) else None
    metrics = compute_metrics(model, inputs, samples, bicubic, labels, req.batch_size) if req.report else None
    written = write_outputs(req.out, [x.name for x in inputs], samples,
                            comparison_grid(nearest, bicubic, samples, targets))
    if failures:
        listed = "; ".join(f"{Path(f['file']).name}: {f['error']}" for f in failures[:3])
        more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        _warn(f"{len(failures)} of {len(failures) + len(inputs)} inputs skipped: {listed}{more}")
    return {
        "checkpoint": str(path),
        "inputs": [x.name for x in inputs],
        "samples_per_input": req.samples,
        "temperature": float(req.temperature),
        "seed": req.seed,
        "image_size": list(cfg.image_size),
        "source_size": list(cfg.source_size),
        "written": written,
        "failures": failures,
        "metrics": metrics,
        "seconds": round(seconds, 3),
    }
