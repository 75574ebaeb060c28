"""From a configuration to model inputs: the data set a model trains or is evaluated on.

`dataset_for` loads the split a `DataConfig` names at the model's size (as super-resolution pairs
for an encoder-decoder), `check_compatible` says whether it can feed the model, `batches` collates
lists of indices into batches and `unpack` moves a batch to the device as the model takes it.
The `DataConfig` a checkpoint was trained with comes back through
imagetx.config.data_config_from_checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from imagetx.errors import DatasetError, RunError
from imagetx.model.config import ModelConfig

if TYPE_CHECKING:  # the config schema sits above the data layer: its type is named, never imported
    from imagetx.config import DataConfig


def dataset_for(model: ModelConfig, data: DataConfig, split: str, download: bool | None = None) -> Dataset:
    """The `split` of the data set `data` names, at the model's image size and channel count;
    wrapped as (target, source, label) items for a super-resolution model. Raises DatasetError."""
    from imagetx.data import SuperResDataset, load_dataset
    from imagetx.system.paths import cache_root

    celeba_protocol = model.source_size is not None and data.celeba_protocol
    dataset = load_dataset(
        data.name,
        data_dir=data.data_dir,
        split=split,
        image_size=None if celeba_protocol else model.image_size,  # the protocol crops native images
        channels=model.channels,
        download=data.download if download is None else download,
        builtin_size=data.builtin_size,
        cache_dir=cache_root(data.cache_dir),
    )
    if len(dataset) == 0:  # an empty split would make training spin forever and bits/dim 0/0
        raise DatasetError(f"{dataset.description} has no images: give a data set with images in its {split} split")
    if model.source_size is not None:
        try:
            dataset = SuperResDataset(
                dataset, model.source_size, target_size=model.image_size, celeba_protocol=celeba_protocol
            )
        except ValueError as exc:
            raise RunError(f"{dataset.description} cannot make super-resolution pairs: {exc}") from None
    return dataset


def describe(dataset: Dataset) -> tuple[str, str]:
    """(description, split) of a data set, looking through wrappers such as SuperResDataset."""
    inner = dataset
    while not hasattr(inner, "description") and hasattr(inner, "dataset"):
        inner = inner.dataset
    return getattr(inner, "description", type(dataset).__name__), getattr(inner, "split", "?")


def check_compatible(model: ModelConfig, dataset: Dataset) -> None:
    """Raise RunError when the data set cannot feed the model (labels, size, channels)."""
    inner = dataset
    while not hasattr(inner, "num_classes") and hasattr(inner, "dataset"):
        inner = inner.dataset
    name = describe(dataset)[0]
    classes = getattr(inner, "num_classes", 0)
    if model.num_classes and not classes:
        raise RunError(f"the model is class-conditional ({model.num_classes} classes) but {name} has no labels")
    if model.num_classes and classes > model.num_classes:
        raise RunError(f"{name} has {classes} classes but the model has model.num_classes = {model.num_classes}")
    size, channels = getattr(inner, "image_size", None), getattr(inner, "channels", None)
    if size is not None and tuple(size) != tuple(model.image_size) and model.source_size is None:
        raise RunError(f"{name} has {size[0]}x{size[1]} images but the model expects {model.image_size}")
    if channels is not None and channels != model.channels:
        raise RunError(f"{name} has {channels} channel(s) but the model expects {model.channels}")


def batches(
    dataset: Dataset, index_lists: Iterator[Sequence[int]], num_workers: int = 0, seed: int = 0
) -> Iterator[tuple]:
    """Collated batches, one per list of indices: (images uint8 (B, H, W, C), labels long (B,)),
    or (target, source, labels) for super-resolution items. Worker processes when num_workers > 0;
    their seeds come from a private generator, never from the global one."""
    if hasattr(dataset, "get_batch"):
        if num_workers == 0:
            for idx in index_lists:
                yield dataset.get_batch(list(idx))
            return
        # each worker gathers whole batches (one indexing of the array, not B items and a collate)
        source = dict(dataset=_WholeBatches(dataset), sampler=(list(idx) for idx in index_lists), batch_size=None)
    else:
        source = dict(dataset=dataset, batch_sampler=index_lists)
    loader = DataLoader(
        **source,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
    )
    yield from loader


class _WholeBatches(Dataset):
    """A data set with get_batch seen by a DataLoader as one item per list of indices."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, indices: list[int]) -> tuple:
        return self.dataset.get_batch(indices)


def unpack(batch: tuple, model: ModelConfig, device: torch.device) -> tuple:
    """A collated batch -> (x, labels or None, source or None) on device, as the model takes them."""
    if len(batch) == 3:
        x, source, labels = batch
    else:
        (x, labels), source = batch, None
    x = x.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True).long() if model.num_classes else None
    source = source.to(device, non_blocking=True) if model.source_size is not None else None
    return x, labels, source
