"""Image files in and out: Pillow to read, torchvision to tile grids, every write atomic."""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imagetx.errors import ImageFileError
from imagetx.system.atomic import atomic_write

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


_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16- and 32-bit integer grayscale


def pil_to_tensor(image: Image.Image, channels: int) -> tuple[torch.Tensor, str | None]:
    """A Pillow image of any mode -> uint8 (H, W, channels) and a notice saying what was
    converted (None when nothing was).

    Values keep their meaning: 16-bit grayscale is scaled to 8 bits (65535 -> 255), not clipped;
    floating-point grayscale in [0, 1] is scaled to [0, 255]; transparency (RGBA, LA, PA, palette
    with a transparent colour) is composited onto white; palette, CMYK and other modes convert
    through Pillow; RGB -> gray is Pillow's "L" (ITU-R 601-2).
    """
    mode = image.mode
    target = "L" if channels == 1 else "RGB"
    steps = []
    if mode in _WIDE_GRAY or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            peak = 1.0 if values.size and values.max() <= 1.0 else 255.0
        else:
            peak = 65535.0 if not values.size or values.max() <= 65535 else float(values.max())
        image = Image.fromarray(np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
        steps.append(f"{'16-bit' if peak == 65535.0 else 'floating-point' if mode == 'F' else 'wide'} values scaled to 8 bits")
    elif "A" in mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        steps.append("transparency composited onto white")
    if image.mode != target:
        image = image.convert(target)
    notice = None if mode == target else f"converted from {mode} to {target}" + (f" ({', '.join(steps)})" if steps else "")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.copy()), notice


def read_image(path: str | os.PathLike, channels: int) -> tuple[torch.Tensor, list[str]]:
    """Read an image file as uint8 (H, W, channels), converting the mode as pil_to_tensor does.

    Returns the image and notices (e.g. a conversion from RGBA); raises ImageFileError for a
    missing, unreadable, truncated or implausibly large (decompression bomb) file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"{path}: no such file")
    return decode_image(path, str(path), channels)


def decode_image(source: str | os.PathLike | bytes, name: str, channels: int,
                 max_pixels: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """An image file's path or its bytes (an upload) -> uint8 (H, W, channels) and notices, as
    read_image. name: what messages call it. max_pixels: refuse larger images before decoding
    them; Pillow's decompression-bomb limit applies in any case. Raises ImageFileError."""
    file = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as im:
                if max_pixels is not None and im.width * im.height > max_pixels:
                    raise ImageFileError(f"{name}: {im.width}x{im.height} is more than the {max_pixels} pixels "
                                         "allowed here; send a smaller image")
                im.load()
                image, notice = pil_to_tensor(im, channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageFileError(f"{name}: too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        detail = str(e).replace(repr(file), repr(name))  # Pillow names the file object it was given
        raise ImageFileError(f"{name}: not a readable image ({detail})") from None
    return image, [] if notice is None else [f"{Path(name).name}: {notice}"]


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
