"""MNIST / Fashion-MNIST: IDX files (big-endian header, then raw uint8), plain or gzipped."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from imagetx.data.dataset import DatasetError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}
SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}


def tree(name: str) -> str:
    files = "\n".join(f"  {f}[.gz]" for pair in FILES.values() for f in pair)
    return f"DATA_DIR/\n{files}\n(or the same files in DATA_DIR/{TORCHVISION_FOLDER[name]}/raw/)"


def _locate(folder: Path, stem: str) -> Path | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def find_idx(name: str, data_dir: Path) -> Path | None:
    """The folder holding the IDX files: DATA_DIR or DATA_DIR/<MNIST|FashionMNIST>/raw."""
    for folder in (data_dir, data_dir / TORCHVISION_FOLDER[name] / "raw"):
        if any(_locate(folder, stem) for pair in FILES.values() for stem in pair):
            return folder
    return None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One IDX file -> uint8 array shaped by its header dims; DatasetError naming path if malformed."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"corrupt IDX file {path}: {exc}; download it again") from exc
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"corrupt IDX file {path}: {len(data)} bytes is shorter than the {header}-byte header")
    found, *dims = struct.unpack(f">I{ndim}i", data[:header])
    if found != magic:
        raise DatasetError(f"corrupt IDX file {path}: magic number {found}, expected {magic}")
    expected = header + int(np.prod(dims))
    if min(dims) < 0 or len(data) != expected:
        raise DatasetError(
            f"corrupt IDX file {path}: header dims {tuple(dims)} need {expected} bytes, file has {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_mnist(name: str, folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images uint8 (N, 28, 28, 1), labels long (N,) in [0, 10)."""
    paths = []
    for stem in FILES[split]:
        path = _locate(folder, stem)
        if path is None:
            raise DatasetError(
                f"{TITLES[name]} file {stem}[.gz] missing in {folder}; download the data set again "
                f"(or pass --download)\nexpected:\n{tree(name)}"
            )
        paths.append(path)
    images = read_idx(paths[0], IMAGES_MAGIC)
    labels = read_idx(paths[1], LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
    if len(labels) and labels.max() >= 10:
        raise DatasetError(f"corrupt IDX file {paths[1]}: label {labels.max()} outside 0..9")
    return torch.from_numpy(images.copy())[..., None], torch.from_numpy(labels.astype(np.int64))
