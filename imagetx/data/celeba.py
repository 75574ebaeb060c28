"""CelebA (aligned and cropped, 218x178 JPEG) in torchvision's layout, decoded lazily per item."""

from __future__ import annotations

import os
from pathlib import Path

from imagetx.data.dataset import DatasetError, DirReader, LazyImageDataset, lazy

NATIVE_SIZE = (218, 178)
PARTITIONS = {"train": 0, "valid": 1, "test": 2}
TREE = """DATA_DIR/
  celeba/
    img_align_celeba/
      000001.jpg ... 202599.jpg
    list_eval_partition.txt   (lines "000001.jpg 0": 0 train, 1 valid, 2 test)
(download img_align_celeba.zip and list_eval_partition.txt by hand from the CelebA page)"""


def find_celeba(data_dir: Path) -> Path | None:
    """DATA_DIR/celeba/ or DATA_DIR itself, whichever holds img_align_celeba/."""
    for root in (data_dir / "celeba", data_dir):
        if (root / "img_align_celeba").is_dir():
            return root
    return None


def _partition(path: Path, split: str) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    names = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DatasetError(f"malformed line {number} in {path}: {line!r}; expected '000001.jpg 0'")
        if int(fields[1]) == PARTITIONS[split]:
            names.append(fields[0])
    return names


def load_celeba(root: Path, split: str, image_size, channels) -> LazyImageDataset:
    """split "train" (partition 0), "valid" (1) or "test" (2); unlabelled, native 218x178 RGB."""
    partition_file = root / "list_eval_partition.txt"
    if not partition_file.is_file():
        raise DatasetError(f"CelebA partition file missing: {partition_file}; download it by hand\nexpected:\n{TREE}")
    names = sorted(_partition(partition_file, split))
    if not names:
        raise DatasetError(f"no images in the CelebA {split} partition of {partition_file}")
    image_dir = root / "img_align_celeba"
    present = set(os.listdir(image_dir))
    missing = [n for n in names if n not in present]
    if missing:
        raise DatasetError(
            f"{len(missing)} CelebA {split} images listed in {partition_file.name} are missing from "
            f"{image_dir} (first: {missing[0]}); extract img_align_celeba.zip again\nexpected:\n{TREE}"
        )
    return lazy(
        DirReader(image_dir, names),
        None,
        native_size=NATIVE_SIZE,
        native_channels=3,
        crop_to_aspect=True,
        name="celeba",
        split=split,
        base_description="CelebA 218x178 (aligned)",
        split_label=split,
        num_classes=0,
        image_size=image_size,
        channels=channels,
    )
