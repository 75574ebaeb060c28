"""Downsampled ImageNet 32x32 / 64x64, two different data sets that give different bits/dim:

(a) van den Oord et al. 2016 (the paper's and the likelihood literature's): unlabelled PNG files in
    train_32x32/ and valid_32x32/ or in the tar archives of those names; read lazily per item.
(b) Chrabaszcz et al. 2017 (what image-net.org serves today): npz batches with keys data
    (N, 3*S*S uint8, channel-major) and labels 1..1000; held in memory.

The version is detected from what is in data_dir and named in every description.
"""

from __future__ import annotations

import os
import re
import tarfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from imagetx.data.dataset import DatasetError, DirReader, ImageDataset, TarReader, in_memory, lazy, streamed

VAN_DEN_OORD = "van den Oord et al. PNG version"
CHRABASZCZ = "Chrabaszcz et al. npz version"


def tree(size: int) -> str:
    s = f"{size}x{size}"
    return f"""DATA_DIR/  either the van den Oord et al. version (the paper's; unlabelled PNG files):
  train_{s}/*.png   (or the archive train_{s}.tar)
  valid_{s}/*.png   (or the archive valid_{s}.tar)
or the Chrabaszcz et al. version (image-net.org's npz files, labelled):
  Imagenet{size}_train_npz/train_data_batch_1.npz ... train_data_batch_10.npz
  Imagenet{size}_val_npz/val_data.npz
  (the .npz files may also sit directly in DATA_DIR)"""


def _batch_number(path: Path) -> int:
    match = re.search(r"(\d+)\.npz$", path.name)
    return int(match.group(1)) if match else 0


def find_png(data_dir: Path, size: int, part: str) -> Path | None:
    for path in (data_dir / f"{part}_{size}x{size}", data_dir / f"{part}_{size}x{size}.tar"):
        if path.exists():
            return path
    return None


def find_npz(data_dir: Path, size: int, part: str) -> list[Path]:
    """part "train": all train_data_batch_*.npz (in DATA_DIR or Imagenet{size}_train*/, e.g. the
    64x64 part1/part2 folders), sorted by batch number; part "valid": val_data.npz."""
    prefix = f"Imagenet{size}_{'train' if part == 'train' else 'val'}"
    folders = [data_dir] + sorted(p for p in data_dir.glob(f"{prefix}*") if p.is_dir())
    pattern = "train_data_batch_*.npz" if part == "train" else "val_data.npz"
    files = [f for folder in folders for f in folder.glob(pattern) if f.is_file()]
    return sorted(set(files), key=lambda f: (_batch_number(f), str(f)))


def _png_reader(path: Path) -> DirReader | TarReader:
    if path.is_dir():
        names = sorted(e.name for e in os.scandir(path) if e.name.lower().endswith(".png"))
        if not names:
            raise DatasetError(f"no .png files in {path}; extract the archive there again")
        return DirReader(path, names)
    try:
        # "r:" refuses compressed archives: member offsets are only meaningful in a plain tar.
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar if m.isfile() and m.name.lower().endswith(".png")]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"cannot read the tar archive {path}: {exc}; download it again or extract it") from exc
    if not members:
        raise DatasetError(f"no .png files in the archive {path}")
    members.sort(key=lambda m: m.name)
    return TarReader(path, [m.name for m in members], [m.offset_data for m in members], [m.size for m in members])


def _npz_parts(files: list[Path], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One file at a time, checked -> (images uint8 (n, S, S, 3) view, labels int64 (n,) in [0, 1000))."""
    for path in files:
        target = _npz_array(path, "labels").astype(np.int64) - 1  # stored 1..1000
        count = len(target)
        data = _npz_array(path, "data")
        if data.dtype != np.uint8 or data.shape != (count, 3 * size * size):
            raise DatasetError(
                f"corrupt ImageNet file {path}: expected uint8 data ({count}, {3 * size * size}), "
                f"got {data.dtype} {data.shape}"
            )
        if count and not (target.min() >= 0 and target.max() < 1000):
            raise DatasetError(f"corrupt ImageNet file {path}: labels outside 1..1000")
        yield data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1), target  # (n, S, S, 3)


def _labels(files: list[Path]) -> np.ndarray:
    """All labels, in [0, 1000) (cheap: npz members load lazily, the images stay on disk)."""
    parts = [_npz_array(path, "labels").astype(np.int64) - 1 for path in files]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _read_npz(files: list[Path], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images uint8 (N, S, S, 3), labels long (N,) in [0, 1000); one preallocated copy."""
    n = len(_labels(files))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    start = 0
    for part, target in _npz_parts(files, size):
        images[start : start + len(part)] = part
        labels[start : start + len(part)] = target
        start += len(part)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _npz_array(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return np.asarray(npz[key])
    except KeyError as exc:
        raise DatasetError(f"corrupt ImageNet file {path}: no '{key}' array") from exc
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DatasetError(f"corrupt ImageNet file {path}: {exc}; download it again") from exc


def load_imagenet(
    name: str, size: int, data_dir: Path, split: str, image_size, channels, stream: bool = False
) -> ImageDataset:
    """split "train", or "test"/"valid" (both the validation set, the only held-out split).
    stream: the npz version as a StreamedImageDataset (read file by file, for the data cache)."""
    part = "train" if split == "train" else "valid"
    png = find_png(data_dir, size, part)
    npz = find_npz(data_dir, size, part)
    common = dict(name=name, split=split, split_label=part, image_size=image_size, channels=channels)
    if png is not None:
        if npz:
            warnings.warn(
                f"{data_dir} holds both ImageNet versions; using the {VAN_DEN_OORD} ({png.name}), "
                f"ignoring the {CHRABASZCZ}",
                stacklevel=3,
            )
        return lazy(
            _png_reader(png),
            None,
            native_size=(size, size),
            native_channels=3,
            crop_to_aspect=True,
            base_description=f"ImageNet {size}x{size} ({VAN_DEN_OORD})",
            num_classes=0,
            **common,
        )
    if npz and stream:
        return streamed(
            lambda: (torch.from_numpy(np.ascontiguousarray(part)) for part, _ in _npz_parts(npz, size)),
            torch.from_numpy(_labels(npz)),
            native_size=(size, size),
            native_channels=3,
            base_description=f"ImageNet {size}x{size} ({CHRABASZCZ})",
            num_classes=1000,
            **common,
        )
    if npz:
        images, labels = _read_npz(npz, size)
        return in_memory(
            images,
            labels,
            base_description=f"ImageNet {size}x{size} ({CHRABASZCZ})",
            num_classes=1000,
            **common,
        )
    raise DatasetError(
        f"ImageNet {size}x{size} {part} split not found in {data_dir}; download it by hand "
        f"(nothing is downloaded automatically)\nexpected:\n{tree(size)}"
    )
