"""Pixel-exact image transforms on uint8 (N, H, W, C) tensors: area resizing, crops, channels."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as TF

# Work on at most this many input elements at a time: bounds the float copies made while
# resizing or converting a whole data set held in memory (ImageNet 64x64 is 15.7 GB of uint8).
_CHUNK_ELEMENTS = 1 << 24


def _chunked(images: torch.Tensor, out_shape: tuple[int, ...], fn: Callable) -> torch.Tensor:
    """Apply fn to slices of images along dim 0 and write the results into one new tensor."""
    n = images.shape[0]
    per_image = max(1, images[0].numel()) if n else 1
    step = max(1, _CHUNK_ELEMENTS // per_image)
    out = torch.empty((n, *out_shape), dtype=torch.uint8)
    for start in range(0, n, step):
        out[start : start + step] = fn(images[start : start + step])
    return out


def _area_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float32 matrix: row i holds the fraction of output cell i covered by each
    input cell, so a matmul gives the exact area average (a plain block mean for integer factors)."""
    scale = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64)[:, None] * scale  # (n_out, 1)
    j = torch.arange(n_in, dtype=torch.float64)[None, :]  # (1, n_in)
    overlap = (torch.minimum(j + 1, lo + scale) - torch.maximum(j, lo)).clamp_(min=0)
    return (overlap / overlap.sum(dim=1, keepdim=True)).to(torch.float32)


def area_downsample(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """images: uint8 (N, H, W, C) -> uint8 (N, h, w, C) with h <= H, w <= W.

    Each output pixel is the area-weighted mean of the input pixels under it (TF's AREA, Pillow's
    BOX; for integer factors the block mean, equal to interpolate(mode="area")), rounded half to even.
    For integer factors the mean is rounded exactly, in integer arithmetic, so a block whose mean
    is exactly half way always goes to the even value (imagetx.model.consistency relies on it).
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
    _, big_h, big_w, c = images.shape
    h, w = int(size[0]), int(size[1])
    if not (0 < h <= big_h and 0 < w <= big_w):
        raise ValueError(f"area_downsample cannot go from {big_h}x{big_w} to {h}x{w}")
    if (h, w) == (big_h, big_w):
        return images.clone()
    if big_h % h == 0 and big_w % w == 0:
        return _chunked(images, (h, w, c), lambda x: _block_mean(x, big_h // h, big_w // w))
    rows, cols = _area_weights(big_h, h), _area_weights(big_w, w)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("hH,bHWC->bhWC", rows, x.to(torch.float32))  # (b, h, W, C)
        x = torch.einsum("wW,bhWC->bhwC", cols, x)  # (b, h, w, C)
        return x.round_().clamp_(0, 255).to(torch.uint8)

    return _chunked(images, (h, w, c), fn)


def _block_mean(images: torch.Tensor, fh: int, fw: int) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, H/fh, W/fw, C): each fh x fw block's mean, rounded half to
    even exactly (integer sums: no float error can move a mean across the half way point)."""
    n, big_h, big_w, c = images.shape
    k = fh * fw
    sums = images.long().view(n, big_h // fh, fh, big_w // fw, fw, c).sum((2, 4))
    q, r = sums // k, sums % k
    up = (2 * r > k) | ((2 * r == k) & (q % 2 == 1))  # above half way, or half way from an odd value
    return (q + up.long()).to(torch.uint8)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, h, w, C): area averaging when shrinking both sides,
    otherwise antialiased bilinear (torchvision) for the sides that grow."""
    _, big_h, big_w, c = images.shape
    h, w = int(size[0]), int(size[1])
    if (h, w) == (big_h, big_w):
        return images
    if h <= big_h and w <= big_w:
        return area_downsample(images, (h, w))

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = TF.resize(x.permute(0, 3, 1, 2), [h, w], antialias=True)  # (b, C, h, w)
        return x.permute(0, 2, 3, 1)  # (b, h, w, C)

    return _chunked(images, (h, w, c), fn)


def center_crop_to_aspect(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H, W, C) -> the largest centred (H', W', C) view whose aspect ratio is size's h / w."""
    big_h, big_w = image.shape[:2]
    h, w = size
    if big_h * w > big_w * h:  # too tall: crop rows
        new_h = max(1, round(big_w * h / w))
        top = (big_h - new_h) // 2
        return image[top : top + new_h]
    new_w = max(1, round(big_h * w / h))
    left = (big_w - new_w) // 2
    return image[:, left : left + new_w]


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, H, W, 1), ITU-R 601-2 luma computed exactly as Pillow's
    convert("L") does (16-bit fixed point, rounded)."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.int32)
        luma = x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000
        return (luma >> 16).to(torch.uint8)[..., None]

    return _chunked(images, (*images.shape[1:3], 1), fn)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, H, W, C) with C in {1, 3} -> uint8 (N, H, W, channels); gray -> RGB replicates."""
    c = images.shape[-1]
    if c == channels:
        return images
    if c == 3 and channels == 1:
        return rgb_to_gray(images)
    if c == 1 and channels == 3:
        return images.expand(*images.shape[:-1], 3).contiguous()
    raise ValueError(f"cannot convert {c} channels to {channels}")
