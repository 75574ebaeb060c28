"""Numbers imagetx reports about a model and its samples.

- bits/dim: a negative log-likelihood in nats over an image's H*W*C sub-pixels, nll / (dims ln 2);
- psnr: 10 log10(255^2 / MSE) in dB; identical images would score infinity, they score PSNR_CAP
  instead so averages and JSON stay finite;
- consistency (super-resolution): mean |area_downsample(sample) - source| in 0-255 units, 0 when
  the sample explains its low-resolution input exactly;
- conditional bits/dim (super-resolution): nll(target | source) / (H*W*C ln 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LN2 = math.log(2.0)
PSNR_CAP = 100.0  # dB reported for identical images (MSE = 0)


def bits_per_dim(nll_nats, dims: int):
    """Negative log-likelihood in nats (a float or a tensor) over `dims` sub-pixels -> bits/dim."""
    return nll_nats / (dims * LN2)


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
    return bits_per_dim(torch.cat(out), model.config.num_dims)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def compute_metrics(model, inputs: Sequence, samples: torch.Tensor, bicubic: torch.Tensor,
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
