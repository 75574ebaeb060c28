"""The built-in procedural data set: one coloured shape per image on a background of one colour
or of two tones split at a horizon. Needs no files and is bit-identical for a seed. It is made
for a small model learning on a CPU in minutes: colours come from a palette (channel levels in
steps of 51), edges are hard, and shapes are large and near the centre, so each channel takes
few distinct values and the model has little to learn beyond the shapes themselves.
"""

from __future__ import annotations

import numpy as np
import torch

KINDS = ("circle", "square", "triangle", "ring", "plus", "diamond")
NUM_TRAIN = 20000
NUM_TEST = 2000
_SPLIT_STREAMS = {"train": 0, "test": 1}
# Uniform draws per image, one row each: image i depends only on (seed, stream, i), so the first
# k images are the same whatever the count. Fixed at 20 (spares included): changing it changes
# every image.
_PARAMS = 20
_CHUNK = 1024


def _palette(rgb: np.ndarray) -> np.ndarray:
    """Snap channel values in [0, 255] to the palette levels 0, 51, ..., 255."""
    return np.round(rgb / 51.0) * 51.0


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """h, s, v float (N,) in [0, 1] -> float (N, 3) in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0) % 6.0  # (N, 3)
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[:, None] - v[:, None] * s[:, None] * ramp


def _shape_sdf(kind: np.ndarray, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (negative inside) of each image's shape.

    kind long (B,); dx, dy float (B, H, W) offsets from the shape centre; r float (B,) its radius.
    """
    sdf = np.empty_like(dx)
    r3 = r[:, None, None]  # (B, 1, 1)
    for k, name in enumerate(KINDS):
        m = kind == k
        if not m.any():
            continue
        x, y, rk = dx[m], dy[m], r3[m]
        ax, ay = np.abs(x), np.abs(y)
        if name == "circle":
            d = np.sqrt(x * x + y * y) - rk
        elif name == "square":
            d = np.maximum(ax, ay) - 0.8 * rk
        elif name == "triangle":  # apex up (y grows downwards), centred on its centroid
            inradius = 0.5 * rk
            d = np.maximum(y, 0.8660254 * ax - 0.5 * y) - inradius
        elif name == "ring":
            thickness = np.maximum(0.32 * rk, 1.3)
            d = np.abs(np.sqrt(x * x + y * y) - (rk - thickness / 2)) - thickness / 2
        elif name == "plus":
            arm = np.maximum(0.3 * rk, 1.0)
            d = np.minimum(np.maximum(ax - rk, ay - arm), np.maximum(ax - arm, ay - rk))
        elif name == "diamond":
            d = (ax + ay - rk) * 0.70710678
        sdf[m] = d
    return sdf


def _render(u: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """u float64 (B, _PARAMS) uniforms -> images uint8 (B, H, W, 3), kinds long (B,)."""
    u = u.astype(np.float32)  # float32 throughout: twice as fast, and ample for 8-bit pixels
    side = min(height, width)
    kind = np.minimum((u[:, 0] * len(KINDS)).astype(np.int64), len(KINDS) - 1)
    r = side * (0.3 + 0.12 * u[:, 1])
    # Near the centre: the centre moves by up to a tenth of the side each way.
    cx = width / 2 + 0.2 * side * (u[:, 2] - 0.5)
    cy = height / 2 + 0.2 * side * (u[:, 3] - 0.5)
    dark = u[:, 4] < 0.5

    # High contrast: a bright saturated shape on a dark background or a deep one on a light one.
    sat = np.where(dark, 0.35 + 0.65 * u[:, 6], 0.6 + 0.4 * u[:, 6])
    val = np.where(dark, 0.85 + 0.15 * u[:, 7], 0.3 + 0.3 * u[:, 7])
    fg = _palette(_hsv_to_rgb(u[:, 5], sat, val) * 255.0)  # (B, 3)
    base = np.where(dark, 0.0, 175.0)[:, None]
    bg1 = _palette(base + 80.0 * u[:, 8:11])  # (B, 3)
    bg2 = _palette(base + 80.0 * u[:, 11:14])

    ys = np.arange(height, dtype=np.float32)[None, :, None] + 0.5  # (1, H, 1) pixel centres
    xs = np.arange(width, dtype=np.float32)[None, None, :] + 0.5  # (1, 1, W)
    # Background: 60% one colour, 40% two tones split at a horizon (a row between 30% and 70% of
    # the height): t = 0 above it (bg1), 1 below (bg2).
    two_tone = u[:, 14] >= 0.6
    horizon = np.where(two_tone, height * (0.3 + 0.4 * u[:, 15]), np.inf)
    t = (ys >= horizon[:, None, None]).astype(np.float32)  # (B, H, 1)
    t = np.broadcast_to(t, (len(u), height, width))

    full = (len(u), height, width)
    dx = np.broadcast_to(xs - cx[:, None, None], full)  # (B, H, W)
    dy = np.broadcast_to(ys - cy[:, None, None], full)
    sdf = _shape_sdf(kind, dx, dy, r)
    coverage = (sdf < 0).astype(np.float32)[..., None]  # crisp edges: a pixel is shape or background

    # In place, to keep passes over the (B, H, W, 3) floats few: background, then blend the shape.
    image = t[..., None] * (bg2 - bg1)[:, None, None, :]  # (B, H, W, 3)
    image += bg1[:, None, None, :]
    shape = fg[:, None, None, :] - image
    shape *= coverage
    image += shape
    return np.rint(image, out=image).astype(np.uint8), kind  # convex mixes of [0, 255]: no clip


def make_shapes(
    count: int, size: tuple[int, int] = (32, 32), seed: int = 0, stream: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images uint8 (count, H, W, 3), labels long (count,) in [0, len(KINDS)).

    Deterministic in (seed, stream); different streams are independent random sequences.
    """
    height, width = int(size[0]), int(size[1])
    if height < 4 or width < 4:
        raise ValueError(f"builtin shapes need at least 4x4 pixels, got {height}x{width}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(stream)])))
    u = rng.random((count, _PARAMS))
    images = np.empty((count, height, width, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for start in range(0, count, _CHUNK):
        chunk = slice(start, start + _CHUNK)
        images[chunk], labels[chunk] = _render(u[chunk], height, width)
    return torch.from_numpy(images), torch.from_numpy(labels)


def builtin_split(
    split: str, size: tuple[int, int], seed: int, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST
) -> tuple[torch.Tensor, torch.Tensor]:
    """The train or test split: independent random streams, so the splits never share an image."""
    count = num_train if split == "train" else num_test
    return make_shapes(count, size, seed, _SPLIT_STREAMS[split])
