"""What the server computes, on its worker thread: samples, completions, super-resolutions and
likelihoods, each with the bits every sub-pixel cost as a heat map, and the frames a streaming
request is sent while its images are drawn. Requests arrive checked (imagetx.serve.requests)."""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from imagetx.model import dmol
from imagetx.model.decoding import DEFAULT_WINDOW, resolve_decode
from imagetx.sample import labels_for
from imagetx.serve.jobs import Job
from imagetx.serve.models import ServedModel
from imagetx.storage.images import comparison_grid, display_scale, grid, png_bytes
from imagetx.superres import super_resolve, upscale
from imagetx.training.metrics import LN2, consistency

BITS_MAX = 8.0  # the heat maps' scale: 0 bits (black) to 8 bits (a uniform guess) and more (white-yellow)
FRAMES = 14  # frames a streamed image is sent in, about (every few rows)


@dataclass
class Outcome:
    """A job's result: `summary` (JSON: what a streamed request gets as its `result` event) and
    `picture`, uint8 (H', W', C), the PNG a plain request gets."""

    summary: dict
    picture: torch.Tensor


def data_url(image: torch.Tensor) -> str:
    """uint8 (H, W, C) -> a PNG as a data: URL (what <img> and a canvas take)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def _palette() -> torch.Tensor:
    from matplotlib import colormaps

    return torch.from_numpy((colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8))


_PALETTE = _palette()


@torch.inference_mode()
def bits_per_subpixel(model, x: torch.Tensor, labels=None, source=None) -> torch.Tensor:
    """uint8 or long (B, H, W, C) -> float32 (B, H, W, C): the bits each sub-pixel cost under the
    model, -log2 p(x_i | x_<i), from one teacher-forced forward pass (positions not yet decided
    count as zeros). DMOL models give a pixel's bits, shared equally by its channels."""
    x = x.long()
    out = model(x, labels, source).float()
    if model.config.output == "categorical":
        log_p = model.log_probs(out, x, source)  # (B, H, W, C, 256)
        nats = -log_p.gather(-1, x[..., None])[..., 0]
    else:
        C = model.config.channels
        per_pixel = dmol.dmol_nll(out, x, C, model.config.num_mixtures)  # (B, H, W)
        nats = (per_pixel / C)[..., None].expand(*per_pixel.shape, C)
    return nats / LN2


def heat_map(bits: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """float (H, W, C) bits -> uint8 (H, C*W, 3): one panel per channel, side by side, coloured
    from 0 to BITS_MAX bits; sub-pixels not yet decided (known False) grey."""
    H, W, C = bits.shape
    # a value the model rules out (a consistent model's, before its prefix is drawn) costs infinite bits
    bits = torch.nan_to_num(bits.float(), nan=BITS_MAX, posinf=BITS_MAX)
    index = (bits.clamp(0, BITS_MAX) * (255 / BITS_MAX)).round().long().cpu()
    rgb = _PALETTE[index]  # (H, W, C, 3)
    if known is not None:
        rgb[~known.cpu()] = torch.tensor([96, 96, 96], dtype=torch.uint8)
    return rgb.permute(0, 2, 1, 3).reshape(H, C * W, 3)  # (H, C, W, 3) -> channel panels


def decided(model, done: int) -> torch.Tensor:
    """bool (H, W, C): the sub-pixels of the first `done` generation steps."""
    cfg = model.config
    H, W = cfg.image_size
    flat = torch.zeros(cfg.seq_len, dtype=torch.bool)
    flat[model.layout.order[:done].cpu()] = True  # grid positions: (H, W * tokens per pixel)
    return flat.view(H, W, -1).expand(H, W, cfg.channels)


class Frames:
    """The decoder's watch callback: checks the job is still wanted after every step or pass
    and sends a `frame` event every few rows: {"done", "total", "images", "bits" (data URLs),
    "accepted": the positions each parallel pass since the last frame accepted, "passes"}."""

    def __init__(self, job: Job, served: ServedModel, labels=None, source=None, kept: torch.Tensor | None = None):
        self.job, self.served, self.labels, self.source, self.kept = job, served, labels, source, kept
        self.cols = served.config.grid[1]
        self.every = max(1, round(served.config.image_size[0] / FRAMES))  # rows between frames
        self.next_row = self.every
        self.last_done, self.accepted, self.passes = 0, [], 0

    def __call__(self, done: int, total: int, image: torch.Tensor) -> None:
        self.job.check()
        self.accepted.append(done - self.last_done)
        self.last_done, self.passes = done, self.passes + 1
        if done < total and done // self.cols < self.next_row:
            return
        self.next_row = done // self.cols + self.every
        known = decided(self.served.model, done)
        bits = bits_per_subpixel(self.served.model, image, self.labels, self.source)
        maps = []
        for i in range(image.shape[0]):
            k = known if self.kept is None else known | self.kept[i].cpu()
            maps.append(data_url(heat_map(bits[i], k)))
        self.job.emit("frame", {"done": done, "total": total, "passes": self.passes, "accepted": self.accepted,
                                "images": [data_url(x) for x in image.to(torch.uint8)], "bits": maps})
        self.accepted = []


def _number(value: float, digits: int) -> float | None:
    """A float for JSON: None where it is not finite (JSON has no infinity)."""
    return round(float(value), digits) if math.isfinite(value) else None


def _images_summary(served: ServedModel, images: torch.Tensor, bits: torch.Tensor, frames: Frames,
                    decode: str, start: float) -> dict:
    dims = served.config.num_dims
    return {
        "model": served.name, "images": [data_url(x) for x in images], "bits": [data_url(heat_map(b)) for b in bits],
        "bpd": [_number(float(b.double().sum()) / dims, 4) for b in bits], "bits_max": BITS_MAX,
        "decode": decode, "passes": frames.passes, "seconds": round(time.perf_counter() - start, 3),
    }


def sample(job: Job, served: ServedModel, n: int, temperature: float, seed: int, label: int | None,
           decode: str, prime: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> Outcome:
    """n images (completions of `prime` where `kept`, bool (H, W, C), is True) -> Outcome."""
    start = time.perf_counter()
    device = next(served.model.parameters()).device
    labels = labels_for(served.model, n, label)
    labels = None if labels is None else labels.to(device)
    prime_n = mask_n = None
    if prime is not None:
        prime_n = prime.expand(n, *prime.shape).to(device)
        mask_n = kept.expand(n, *kept.shape).to(device)
    frames = Frames(job, served, labels, kept=mask_n)
    mode = resolve_decode(served.decoder, decode, n)
    images = served.decoder.sample(n, labels=labels, temperature=temperature, seed=seed, prime=prime_n,
                                   prime_mask=mask_n, decode=mode, window=DEFAULT_WINDOW, watch=frames).cpu()
    bits = bits_per_subpixel(served.model, images.to(device), labels).cpu()
    summary = _images_summary(served, images, bits, frames, mode, start)
    summary.update(labels=None if labels is None else labels.tolist(), temperature=temperature, seed=seed)
    scale = display_scale(served.config.image_size)
    if prime is None:
        return Outcome(summary, grid(images, scale=scale))
    return Outcome(summary, grid(torch.cat([prime[None].cpu(), images]), nrow=n + 1, scale=scale))  # one row, the prime first


def superres(job: Job, served: ServedModel, source: torch.Tensor, n: int, temperature: float, seed: int,
             label: int | None, decode: str, consistent: bool) -> Outcome:
    """source uint8 (h, w, C) -> n super-resolutions beside the input (nearest) and bicubic, with
    their consistency with it (mean |area-downsampled sample - source|, 0-255 units)."""
    start = time.perf_counter()
    cfg = served.config
    device = next(served.model.parameters()).device
    labels = labels_for(served.model, n, label)
    labels = None if labels is None else labels.to(device)
    sources = source[None].to(device)
    frames = Frames(job, served, labels, sources.expand(n, *source.shape))
    mode = resolve_decode(served.decoder, decode, n)
    samples = super_resolve(served.decoder, sources, n, None if labels is None else labels[:1], temperature, seed,
                            batch_size=n, consistent=consistent or cfg.consistent, decode=mode,
                            window=DEFAULT_WINDOW, watch=frames).cpu()  # (1, n, H, W, C)
    bits = bits_per_subpixel(served.model, samples[0].to(device), labels, sources.expand(n, *source.shape)).cpu()
    nearest, bicubic = upscale(source[None].cpu(), cfg.image_size, "nearest"), upscale(source[None].cpu(), cfg.image_size, "bicubic")
    summary = _images_summary(served, samples[0], bits, frames, mode, start)
    summary.update(input=data_url(nearest[0]), bicubic=data_url(bicubic[0]), temperature=temperature, seed=seed,
                   consistent=consistent or cfg.consistent,
                   consistency=[_number(float(c), 4) for c in consistency(samples, source[None].cpu())[0]])
    return Outcome(summary, comparison_grid(nearest, bicubic, samples))


def likelihood(job: Job, served: ServedModel, image: torch.Tensor, label: int | None,
               source: torch.Tensor | None = None) -> Outcome:
    """image uint8 (H, W, C) -> its bits/dim and the bits of each sub-pixel (a surprisal map)."""
    device = next(served.model.parameters()).device
    labels = None if label is None else torch.tensor([label], device=device)
    bits = bits_per_subpixel(served.model, image[None].to(device), labels,
                             None if source is None else source[None].to(device))[0].cpu()
    job.check()
    total = float(bits.double().sum())
    picture = heat_map(bits)
    summary = {"model": served.name, "bpd": _number(total / served.config.num_dims, 5), "bits": _number(total, 3),
               "dims": served.config.num_dims, "image": data_url(image), "surprisal": data_url(picture),
               "bits_max": BITS_MAX, "label": label}
    return Outcome(summary, picture)
