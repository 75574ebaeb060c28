"""Exact bits/dim of a model on a data set split: `imagetx eval-bpd`.

bpd = (sum over images of NLL in nats) / (N * H * W * C * ln 2), summed in float64 over one
deterministic pass in eval mode and fp32. For 256-way categorical (and discretized DMOL) outputs
over 8-bit data this is exact: there is no dequantization term. Under torchrun every process
takes a contiguous share of the images (no padding), and the pair (nll_sum, images) is summed
over processes, so each image is counted exactly once.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from imagetx.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint, unwrap_model
from imagetx.config import DataConfig
from imagetx.distributed import all_reduce_sum, distributed, shard
from imagetx.errors import RunError
from imagetx.model.config import ModelConfig

LN2 = math.log(2.0)


# ---- data sets and batches (shared with train.py) ----------------------------------------------
def dataset_for(model: ModelConfig, data: DataConfig, split: str, download: bool | None = None) -> Dataset:
    """The `split` of the data set `data` names, at the model's image size and channel count;
    wrapped as (target, source, label) items for a super-resolution model. Raises DatasetError."""
    from imagetx.data import SuperResDataset, load_dataset

    celeba_protocol = model.source_size is not None and data.celeba_protocol
    dataset = load_dataset(
        data.name,
        data_dir=data.data_dir,
        split=split,
        image_size=None if celeba_protocol else model.image_size,  # the protocol crops native images
        channels=model.channels,
        download=data.download if download is None else download,
        builtin_size=data.builtin_size,
    )
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
    if num_workers == 0 and hasattr(dataset, "get_batch"):
        for idx in index_lists:
            yield dataset.get_batch(list(idx))
        return
    loader = DataLoader(
        dataset,
        batch_sampler=index_lists,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
    )
    yield from loader


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


# ---- bits/dim ------------------------------------------------------------------------------------
def evaluate_bpd(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    limit: int | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict:
    """Exact bits/dim of `model` on the first `limit` images of `dataset` (all when None).

    Deterministic: eval mode, fp32 (no autocast), inference mode, float64 sums. Under torchrun
    every process evaluates its own share and the totals are summed. Returns
    {"bpd", "images", "dataset", "split", "nll_nats" (mean per image), "dims" (per image)}.
    """
    from imagetx.distributed import is_distributed

    model = unwrap_model(model)
    cfg: ModelConfig = model.config
    device = torch.device(device) if device is not None else next(model.parameters()).device
    check_compatible(cfg, dataset)
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n <= 0:
        raise RunError(f"no images to evaluate in {describe(dataset)[0]}")
    rank, world = 0, 1
    if is_distributed():
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    mine = shard(n, rank, world)
    chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (nll_sum, images)
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=n, desc="eval bpd", unit="img", file=sys.stderr, leave=False,
        disable=not (progress and rank == 0), dynamic_ncols=True,
    )
    try:
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            for batch in batches(dataset, iter(chunks), num_workers):
                x, labels, source = unpack(batch, cfg, device)
                nll = model.nll(x, labels=labels, source=source)  # (B,) nats, fp32
                totals[0] += nll.double().sum()
                totals[1] += x.shape[0]
                bar.update(x.shape[0] * world)
    except ValueError as exc:  # the model names what does not fit (size, channels, label range)
        raise RunError(f"{describe(dataset)[0]} does not fit the model: {exc}") from None
    finally:
        bar.close()
        model.train(was_training)
    all_reduce_sum(totals)
    nll_sum, images = totals.tolist()
    images = int(round(images))
    description, split = describe(dataset)
    return {
        "bpd": nll_sum / (images * cfg.num_dims * LN2),
        "images": images,
        "dataset": description,
        "split": split,
        "nll_nats": nll_sum / images,
        "dims": cfg.num_dims,
    }


def run(
    checkpoint: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    download: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """`imagetx eval-bpd`: exact bits/dim of a checkpoint (a file, or a run directory: its newest)
    on a split of the data set it was trained on, or of `dataset` / `data_dir` when given.
    Works under torchrun. Returns evaluate_bpd()'s dict plus "checkpoint" and "step"."""
    if batch_size < 1:
        raise RunError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise RunError(f"limit must be >= 1, got {limit}")
    path = resolve_checkpoint(checkpoint)
    with distributed(device) as ctx:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, path, ctx.device).eval()
        saved = dict(ckpt["config"].get("data") or {})
        data = DataConfig(**{k: v for k, v in saved.items() if k in DataConfig.__dataclass_fields__})
        if dataset is not None:
            data.name = dataset
            data.data_dir = None
        if data_dir is not None:
            data.data_dir = data_dir
        data.download = download
        ds = dataset_for(model.config, data, split)
        result = evaluate_bpd(
            model, ds, batch_size=batch_size, limit=limit, device=ctx.device,
            num_workers=num_workers, progress=progress,
        )
    return {**result, "checkpoint": str(path), "step": int(ckpt["step"])}
