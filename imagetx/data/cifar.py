"""CIFAR-10 / CIFAR-100 in torchvision's layout: pickled batches of channel-major uint8 rows."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from imagetx.data.dataset import DatasetError

_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "num_classes": 10,
        "title": "CIFAR-10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "num_classes": 100,
        "title": "CIFAR-100",
    },
}

TREES = {
    "cifar10": """DATA_DIR/
  cifar-10-batches-py/
    batches.meta
    data_batch_1 ... data_batch_5
    test_batch""",
    "cifar100": """DATA_DIR/
  cifar-100-python/
    meta
    train
    test""",
}


def find_cifar(name: str, data_dir: Path) -> Path | None:
    """The batches folder: DATA_DIR/<folder>/ or DATA_DIR itself; None when neither has the files."""
    layout = _LAYOUT[name]
    for candidate in (data_dir / layout["folder"], data_dir):
        if any((candidate / f).is_file() for f in layout["train"] + layout["test"]):
            return candidate
    return None


# What a CIFAR batch holds: dicts, lists, strings, bytes, numbers and numpy arrays. Unpickling may
# build nothing else, so a file that carries code (a pickle can call any importable function)
# is refused instead of run.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol 2 stores bytes (an array's data) written by Python 3
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks to run {module}.{name}, which a CIFAR batch never does")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DatasetError(f"refusing CIFAR file {path}: {exc}; download the data set again") from None
    except Exception as exc:  # any failure to unpickle means a corrupt or truncated file
        raise DatasetError(
            f"corrupt CIFAR file {path}: {type(exc).__name__}: {exc}; download the data set again"
        ) from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"corrupt CIFAR file {path}: expected a pickled dict, got {type(batch).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def read_cifar(name: str, folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """-> images uint8 (N, 32, 32, 3), labels long (N,), class names (or None without the meta file)."""
    layout = _LAYOUT[name]
    files = [folder / f for f in layout[split]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DatasetError(
            f"{layout['title']} {split} files missing in {folder}: {', '.join(missing)}; "
            f"download the data set again (or pass --download)\nexpected:\n{TREES[name]}"
        )
    images, labels = [], []
    for path in files:
        batch = _unpickle(path)
        if "data" not in batch or layout["label_key"] not in batch:
            raise DatasetError(f"corrupt CIFAR file {path}: needs keys 'data' and '{layout['label_key']}'")
        data = np.asarray(batch["data"])
        target = np.asarray(batch[layout["label_key"]], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(target) != len(data):
            raise DatasetError(
                f"corrupt CIFAR file {path}: expected uint8 data (N, 3072) and N labels, got "
                f"{data.dtype} {data.shape} and {len(target)} labels"
            )
        if len(target) and not (0 <= target.min() and target.max() < layout["num_classes"]):
            raise DatasetError(f"corrupt CIFAR file {path}: labels outside 0..{layout['num_classes'] - 1}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (n, 32, 32, 3) channel-last
        labels.append(target)
    class_names = None
    if (folder / layout["meta"]).is_file():
        meta = _unpickle(folder / layout["meta"])
        class_names = meta.get(layout["names_key"])
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(images)))
    return images, torch.from_numpy(np.concatenate(labels)), class_names


def title(name: str) -> str:
    return _LAYOUT[name]["title"]


def num_classes(name: str) -> int:
    return _LAYOUT[name]["num_classes"]
