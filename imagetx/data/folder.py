"""Any directory tree of images, decoded lazily per item; classes are first-level subfolders."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from PIL import Image

from imagetx.data.dataset import GRAY_MODES, DatasetError, DirReader, LazyImageDataset, lazy

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
HOLDOUT_EVERY = 10  # without train/ and test/ folders, every 10th file (sorted) is the test split
TREE = """DATA_DIR/            class = first-level subfolder (optional: flat folders are unlabelled)
  cat/  a.jpg b.png ...
  dog/  c.jpg ...
or, with explicit splits:
DATA_DIR/
  train/  cat/ ...  dog/ ...   (or images directly)
  test/   cat/ ...  dog/ ...
(files: .jpg .jpeg .png .webp .bmp .gif; without train/ and test/ every 10th file is held out as test)"""


def _scan(folder: Path) -> list[str]:
    """Relative paths ("cat/a.jpg" or "a.jpg") of the image files under folder, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        for f in filenames:
            if f.lower().endswith(EXTENSIONS) and not f.startswith("."):
                found.append(f if rel == "." else os.path.join(rel, f))
    return sorted(found)


def _class_of(rel: str) -> str | None:
    parts = Path(rel).parts
    return parts[0] if len(parts) > 1 else None


def _drop_top_level(files: list[str], folder: Path) -> list[str]:
    """In a labelled tree, files directly in the root have no class: warn and ignore them."""
    top = [f for f in files if _class_of(f) is None]
    if top and len(top) < len(files):
        warnings.warn(f"ignoring {len(top)} image files directly in {folder}: they are in no class folder")
        return [f for f in files if _class_of(f) is not None]
    return files


def _readable(root: Path, files: list[str]) -> tuple[list[str], bool]:
    """Keep the files Pillow can open (header check); -> (kept, all of them grayscale)."""
    kept, all_gray, skipped, first_error = [], True, 0, ""
    for rel in files:
        try:
            with Image.open(root / rel) as image:
                all_gray &= image.mode in GRAY_MODES
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            skipped += 1
            first_error = first_error or f"{rel}: {exc}"
            continue
        kept.append(rel)
    if skipped:
        warnings.warn(f"skipped {skipped} unreadable image files in {root} (first: {first_error})", stacklevel=4)
    return kept, all_gray


def load_folder(data_dir: Path, split: str, image_size, channels) -> LazyImageDataset:
    """split "train" or "test"; image_size defaults to 32x32; every image is centre-cropped to the
    aspect ratio of image_size, then resized."""
    if not data_dir.is_dir():
        raise DatasetError(f"image folder {data_dir} does not exist; pass --data-dir\nexpected:\n{TREE}")
    explicit = (data_dir / "train").is_dir() and (data_dir / "test").is_dir()
    if explicit:
        root = data_dir / split
        per_split = {s: _drop_top_level(_scan(data_dir / s), data_dir / s) for s in ("train", "test")}
        files = per_split[split]
        all_files = per_split["train"] + per_split["test"]
        how = f"{split}/ folder"
    else:
        root = data_dir
        all_files = _drop_top_level(_scan(data_dir), data_dir)
        files = [f for i, f in enumerate(all_files) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == (split == "test")]
        how = f"every {HOLDOUT_EVERY}th file held out as test"
    if not files:
        raise DatasetError(f"no {split} image files in {root}\nexpected:\n{TREE}")
    labelled = _class_of(all_files[0]) is not None
    classes = sorted({_class_of(f) for f in all_files}) if labelled else []

    files, all_gray = _readable(root, files)
    if not files:
        raise DatasetError(f"none of the {split} image files in {root} can be read\nexpected:\n{TREE}")
    labels = None
    if labelled:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[_class_of(f)] for f in files], dtype=torch.long)

    size = tuple(image_size) if image_size is not None else (32, 32)
    kinds = f"{len(classes)} classes" if labelled else "unlabelled"
    return lazy(
        DirReader(root, files),
        labels,
        native_size=size,
        native_channels=1 if all_gray else 3,
        crop_to_aspect=True,
        name="folder",
        split=split,
        base_description=f"image folder {data_dir} ({kinds}, {how}, centre-cropped to {size[0]}x{size[1]})",
        split_label=split,
        num_classes=len(classes),
        class_names=classes or None,
        image_size=size,
        channels=channels,
    )
