"""Image files in and out: Pillow to read, torchvision to tile grids, every write atomic."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imagetx.atomic import atomic_write
from imagetx.errors import ImageFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 (H, W, C) with C in {1, 3} -> a Pillow image ("L" or "RGB")."""
    array = image.detach().cpu().numpy()
    return Image.fromarray(array[..., 0], "L") if array.shape[-1] == 1 else Image.fromarray(array, "RGB")


def png_bytes(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write uint8 (H, W, C) as a PNG, atomically."""
    return atomic_write(path, png_bytes(image))


def grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1) -> torch.Tensor:
    """uint8 (N, H, W, C) -> one uint8 (H', W', C) grid (torchvision's make_grid), each image
    optionally enlarged `scale` times with nearest neighbour so small images stay visible."""
    from torchvision.utils import make_grid

    x = images.permute(0, 3, 1, 2)  # (N, C, H, W)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    g = make_grid(x, nrow=nrow, padding=padding, pad_value=255)  # (3 or C, H', W')
    if images.shape[-1] == 1:
        g = g[:1]
    return g.permute(1, 2, 0).contiguous()


def display_scale(size: tuple[int, int]) -> int:
    """How much to enlarge small images in grids so they can be seen (16x16 -> 4x, 32x32 -> 2x)."""
    return max(1, 64 // max(size))


def comparison_grid(nearest: torch.Tensor, bicubic: torch.Tensor, samples: torch.Tensor,
                    targets: torch.Tensor | None = None) -> torch.Tensor:
    """One row per input: nearest-neighbour enlargement, bicubic, the K samples, the ground truth
    (when known) -> uint8 (H', W', C). nearest, bicubic, targets: (N, H, W, C); samples (N, K, H, W, C)."""
    columns = [nearest[:, None], bicubic[:, None], samples]
    if targets is not None:
        columns.append(targets[:, None])
    rows = torch.cat(columns, dim=1)  # (N, 2 + K (+1), H, W, C)
    N, cols = rows.shape[:2]
    return grid(rows.reshape(N * cols, *rows.shape[2:]), nrow=cols, scale=display_scale(tuple(rows.shape[2:4])))


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> Path:
    return save_png(grid(images, nrow=nrow, scale=scale), path)


def save_npz(images: torch.Tensor, path: str | os.PathLike) -> Path:
    """uint8 (N, H, W, C) -> .npz with the array under "arr_0" (what FID tools read)."""
    buf = io.BytesIO()
    np.savez(buf, images.detach().cpu().numpy().astype(np.uint8))
    return atomic_write(path, buf.getvalue())


def read_image(path: str | os.PathLike, channels: int) -> tuple[torch.Tensor, list[str]]:
    """Read an image file as uint8 (H, W, channels), converting the mode when needed.

    Returns the image and notices (e.g. a conversion from RGBA); raises ImageFileError for a
    missing, unreadable or truncated file.
    """
    path = Path(path)
    notices = []
    if not path.is_file():
        raise ImageFileError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            mode = "L" if channels == 1 else "RGB"
            if im.mode != mode:
                notices.append(f"{path.name}: converted from {im.mode} to {mode}")
                im = im.convert(mode)
            array = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageFileError(f"{path}: not a readable image ({e})") from None
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.copy()), notices


def fit(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H, W, C) -> (h, w, C): centre-crop to the target aspect ratio, then resize (area
    averaging when shrinking), as the folder and CelebA readers do."""
    from imagetx.data.transforms import center_crop_to_aspect, resize_images

    if tuple(image.shape[:2]) == tuple(size):
        return image
    return resize_images(center_crop_to_aspect(image, size)[None].contiguous(), size)[0]


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files directly inside a directory, sorted by name."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
