"""Data sets as uint8 (N, H, W, C) images plus optional labels, one reader per on-disk format.

    from imagetx.data import load_dataset
    ds = load_dataset("cifar10", "data", split="test")
    image, label = ds[0]          # uint8 (32, 32, 3), int
    print(ds.description)         # "CIFAR-10 32x32, test split": goes into every bits/dim report
    ds = load_dataset("cifar10", "data", cache_dir="~/.cache/imagetx")   # decoded once, memory-mapped
"""

from __future__ import annotations

import os
from pathlib import Path

from imagetx.data import builtin as _builtin
from imagetx.data import cache as _cache
from imagetx.data import cifar as _cifar
from imagetx.data import idx as _idx
from imagetx.data import imagenet as _imagenet
from imagetx.data.celeba import TREE as _CELEBA_TREE
from imagetx.data.celeba import find_celeba, load_celeba
from imagetx.errors import ConfigError
from imagetx.data.dataset import DatasetError, ImageDataset, LazyImageDataset, in_memory
from imagetx.data.folder import load_folder
from imagetx.data.imagenet import load_imagenet
from imagetx.data.superres import SuperResDataset, celeba_superres_crop
from imagetx.data.transforms import area_downsample, convert_channels, resize_images

__all__ = [
    "DATASETS",
    "DatasetError",
    "ImageDataset",
    "LazyImageDataset",
    "SuperResDataset",
    "area_downsample",
    "celeba_superres_crop",
    "convert_channels",
    "load_dataset",
    "resize_images",
]

DATASETS = (
    "builtin", "cifar10", "cifar100", "imagenet32", "imagenet64", "celeba", "mnist", "fashion-mnist", "folder",
)
DEFAULT_DATA_DIR = Path("data")
_SPLITS = {name: ("train", "test", "valid") for name in ("imagenet32", "imagenet64", "celeba")}
_TORCHVISION = {
    "cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion-mnist": "FashionMNIST", "celeba": "CelebA",
}


def _size(value, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise DatasetError(f"{what} must be (height, width) or one integer, got {value!r}") from None
    if h < 1 or w < 1:
        raise DatasetError(f"{what} must be positive, got {h}x{w}")
    return h, w


def _download(name: str, data_dir: Path, tree: str) -> None:
    """Fetch with torchvision's downloader into data_dir; any failure -> DatasetError with the tree."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _TORCHVISION[name])
    try:
        if name == "celeba":
            cls(str(data_dir), split="all", download=True)
        else:
            cls(str(data_dir), train=True, download=True)
            cls(str(data_dir), train=False, download=True)
    except Exception as exc:  # network, integrity and extraction errors all end here
        raise DatasetError(
            f"downloading {name} into {data_dir} failed ({type(exc).__name__}: {exc}); download it by hand "
            f"and pass --data-dir\nexpected:\n{tree}"
        ) from exc


def _missing(name: str, data_dir: Path, tree: str, can_download: bool) -> DatasetError:
    hint = "pass --download or download it by hand" if can_download else "download it by hand"
    return DatasetError(f"{name} not found in {data_dir.resolve()}; {hint}\nexpected:\n{tree}")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    image_size: tuple[int, int] | int | None = None,
    channels: int | None = None,
    download: bool = False,
    seed: int = 0,
    builtin_size: tuple[int, int] | int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ImageDataset:
    """Load one split of a data set by name (see DATASETS).

    split: "train" or "test" everywhere; ImageNet "test" is its validation set, and ImageNet and
    CelebA also accept "valid". image_size (H, W): None keeps the native size, otherwise images are
    area-downsampled (centre-cropped to the aspect first for celeba and folder). channels 1 or 3:
    None keeps the native count. download: fetch with torchvision where it can (CIFAR, MNIST,
    Fashion-MNIST, CelebA) when the files are absent. seed and builtin_size only affect "builtin".
    cache_dir: a folder for the decoded-data cache (imagetx.data.cache; None: no cache): the
    split is decoded once into CACHE_DIR and memory-mapped from there (every data set but builtin).
    Returns an ImageDataset whose items are (uint8 (H, W, C), int label or -1).
    Raises ConfigError for an unknown name or split, DatasetError for missing or malformed data
    or an unwritable cache folder.
    """
    if name not in DATASETS:  # a usage error in every command (exit 2)
        raise ConfigError([f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}"])
    splits = _SPLITS.get(name, ("train", "test"))
    if split not in splits:
        raise ConfigError([f"unknown split {split!r} for {name}; choose one of {', '.join(splits)}"])
    image_size = _size(image_size, "image_size")
    if channels not in (None, 1, 3):
        raise DatasetError(f"channels must be 1 or 3, got {channels!r}")
    if data_dir is None:
        system = _idx.SYSTEM_DIRS.get(name)
        data_dir = system if system is not None and system.is_dir() else DEFAULT_DATA_DIR
    data_dir = Path(data_dir).expanduser()
    args = (name, data_dir, split, image_size, channels, download, seed, builtin_size)
    if cache_dir is None or name == "builtin":
        return _load(*args)
    sources = _sources(name, data_dir, split)
    if sources is None:  # missing: the reader says what is expected (or downloads, then it is cached next time)
        return _load(*args)
    request = dict(name=name, split=split, image_size=image_size, channels=channels)
    return _cache.cached(Path(cache_dir).expanduser(), request, data_dir, sources, lambda: _load(*args, stream=True))


def _sources(name: str, data_dir: Path, split: str) -> list[Path] | None:
    """The files and folders a split is decoded from (what the cache checks for changes), or None
    when they are not there."""
    if name in ("cifar10", "cifar100"):
        folder = _cifar.find_cifar(name, data_dir)
        return None if folder is None else [folder]
    if name in ("mnist", "fashion-mnist"):
        folder = _idx.find_idx(name, data_dir)
        return None if folder is None else [folder]
    if name in ("imagenet32", "imagenet64"):
        size, part = int(name[-2:]), "train" if split == "train" else "valid"
        png = _imagenet.find_png(data_dir, size, part)
        return [png] if png is not None else (_imagenet.find_npz(data_dir, size, part) or None)
    if name == "celeba":
        root = find_celeba(data_dir)
        if root is None or not (root / "list_eval_partition.txt").is_file():
            return None
        return [root / "img_align_celeba", root / "list_eval_partition.txt"]
    return [data_dir] if data_dir.is_dir() else None


def _load(name, data_dir: Path, split, image_size, channels, download, seed, builtin_size, stream=False) -> ImageDataset:
    """load_dataset without the cache; stream: a data set the cache can convert without holding
    it whole where the format allows (see StreamedImageDataset)."""
    common = dict(name=name, split=split, split_label=split, image_size=image_size, channels=channels)

    if name == "builtin":
        native = _size(builtin_size, "builtin_size") or image_size or (32, 32)
        try:
            images, labels = _builtin.builtin_split(split, native, seed)
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
        kinds = len(_builtin.KINDS)
        return in_memory(
            images,
            labels,
            base_description=f"builtin shapes {native[0]}x{native[1]} ({kinds} kinds, seed {seed})",
            num_classes=kinds,
            class_names=_builtin.KINDS,
            **common,
        )

    if name in ("cifar10", "cifar100"):
        folder = _cifar.find_cifar(name, data_dir)
        if folder is None and download:
            _download(name, data_dir, _cifar.TREES[name])
            folder = _cifar.find_cifar(name, data_dir)
        if folder is None:
            raise _missing(name, data_dir, _cifar.TREES[name], can_download=True)
        images, labels, class_names = _cifar.read_cifar(name, folder, split)
        return in_memory(
            images,
            labels,
            base_description=f"{_cifar.title(name)} 32x32",
            num_classes=_cifar.num_classes(name),
            class_names=class_names,
            **common,
        )

    if name in ("mnist", "fashion-mnist"):
        folder = _idx.find_idx(name, data_dir)
        if folder is None and download:
            _download(name, data_dir, _idx.tree(name))
            folder = _idx.find_idx(name, data_dir)
        if folder is None:
            raise _missing(name, data_dir, _idx.tree(name), can_download=True)
        images, labels = _idx.read_mnist(name, folder, split)
        return in_memory(
            images,
            labels,
            base_description=f"{_idx.TITLES[name]} 28x28",
            num_classes=10,
            class_names=_idx.CLASS_NAMES[name],
            **common,
        )

    if name in ("imagenet32", "imagenet64"):
        return load_imagenet(name, int(name[-2:]), data_dir, split, image_size, channels, stream)

    if name == "celeba":
        root = find_celeba(data_dir)
        if root is None and download:
            _download(name, data_dir, _CELEBA_TREE)
            root = find_celeba(data_dir)
        if root is None:
            raise _missing(name, data_dir, _CELEBA_TREE, can_download=False)
        return load_celeba(root, split, image_size, channels)

    return load_folder(data_dir, split, image_size, channels)
