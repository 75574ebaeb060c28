"""Data sets written in their real on-disk formats (CIFAR python batches, IDX, PNG folders,
CelebA), and an in-memory one."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def random_images(n: int, h: int, w: int, c: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (n, h, w, c), dtype=np.uint8)


def channel_major(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> (N, C*H*W), the CIFAR / Chrabaszcz row layout."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(root: Path, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for i, fname in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images = random_images(n, 32, 32)
        labels = [(i + j) % 10 for j in range(n)]
        batch = {"batch_label": fname, "labels": labels, "data": channel_major(images), "filenames": ["x.png"] * n}
        (folder / fname).write_bytes(pickle.dumps(batch, protocol=2))
        written[fname] = (images, labels)
    meta = {"label_names": [f"class{k}" for k in range(10)], "num_cases_per_batch": n, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def write_idx(folder: Path, split_images: dict, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in split_images.items():
        files = {
            f"{prefix}-images-idx3-ubyte": idx_bytes(images, 2051),
            f"{prefix}-labels-idx1-ubyte": idx_bytes(labels, 2049),
        }
        for stem, data in files.items():
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)


def write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:07d}.png")


def write_celeba(root: Path, n: int = 6) -> Path:
    images_dir = root / "celeba" / "img_align_celeba"
    images_dir.mkdir(parents=True)
    lines = []
    for i in range(n):
        # Smooth content so JPEG stays close to the source; round-trips are checked against Pillow.
        y, x = np.mgrid[0:218, 0:178]
        im = np.stack([x + 10 * i, y, (x + y) // 2], axis=-1).clip(0, 255).astype(np.uint8)
        Image.fromarray(im).save(images_dir / f"{i + 1:06d}.jpg", quality=95)
        lines.append(f"{i + 1:06d}.jpg {[0, 0, 0, 1, 2, 2][i % 6]}")
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return images_dir


class Images(Dataset):
    """In-memory items (image, label) or, with a source size, (target, source, label)."""

    def __init__(self, n: int, image_size, channels=3, num_classes=0, source_size=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 256, (n, *image_size, channels), generator=g, dtype=torch.uint8)
        self.x[:, 0] = 17  # some structure, so the model is not uniform
        self.labels = torch.randint(0, max(num_classes, 1), (n,), generator=g) if num_classes else None
        self.source = None
        if source_size is not None:
            self.source = torch.randint(0, 256, (n, *source_size, channels), generator=g, dtype=torch.uint8)
        self.num_classes, self.image_size, self.channels = num_classes, tuple(image_size), channels
        self.description, self.split = "random test images", "test"

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        label = int(self.labels[i]) if self.labels is not None else -1
        return (self.x[i], self.source[i], label) if self.source is not None else (self.x[i], label)


RNG = np.random.default_rng(0)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()
