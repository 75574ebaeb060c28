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
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from imagetx import console
from imagetx.storage.checkpoint import load_checkpoint, resolve_checkpoint, unwrap_model
from imagetx.storage.weights import describe_weights, model_from_checkpoint, weights_key, weights_problems
from imagetx.config import data_config_from_checkpoint
from imagetx.data.batches import batches, check_compatible, dataset_for, describe, unpack
from imagetx.errors import ConfigError, RunError
from imagetx.model.config import ModelConfig
from imagetx.system.distributed import all_reduce_sum, device_problems, distributed, shard
from imagetx.system.precision import FP32, Precision, precision_problems
from imagetx.system.precision import resolve as resolve_precision
from imagetx.training.metrics import bits_per_dim


# ---- bits/dim ------------------------------------------------------------------------------------
def nll_sums(model, dataset: Dataset, chunks, device: torch.device, num_workers: int = 0, precision: Precision = FP32,
             source_model=None, advance=None) -> torch.Tensor:
    """The evaluation's pass over the batches of `chunks` (lists of dataset indices) -> float64
    (3,) on device: the summed NLL in nats, the number of images and the source model's summed
    NLL (0 without one). Reads nothing back to the host: on a GPU the batches run without a sync.
    advance(images) is told each batch's size (a progress bar)."""
    cfg = model.config
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.inference_mode(), precision.autocast(device):
        for batch in batches(dataset, iter(chunks), num_workers):
            x, labels, source = unpack(batch, cfg, device)
            nll = model.nll(x, labels=labels, source=source)  # (B,) nats, fp32
            totals[0] += nll.double().sum()
            totals[1] += x.shape[0]
            if source_model is not None:
                own_labels = labels if source_model.config.num_classes else None
                totals[2] += source_model.nll(source, labels=own_labels).double().sum()
            if advance is not None:
                advance(x.shape[0])
    return totals


def evaluate_bpd(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    limit: int | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = False,
    precision: Precision = FP32,
    source_model: torch.nn.Module | None = None,
) -> dict:
    """Exact bits/dim of `model` on the first `limit` images of `dataset` (all when None).

    Deterministic: eval mode, inference mode, float64 sums, and fp32 (autocast off) unless
    `precision` is bf16 (then autocast: faster, approximate). Under torchrun every process
    evaluates its own share and the totals are summed. Returns {"bpd", "images", "dataset",
    "split", "nll_nats" (mean per image), "dims" (per image), "precision", "approximate"}.

    source_model (super-resolution `model` only): an unconditional (or class-conditional) model
    of the low-resolution inputs, scored on the same sources. The result then also holds
    "source_bpd" (its bits/dim per source dimension), "source_bits_per_target_dim" (its NLL over
    the target's dimensions) and "chain_bpd": bpd + source_bits_per_target_dim, the bits/dim of
    the targets under p(source) p(target | source), comparable with an unconditional model's.
    """
    from imagetx.system.distributed import is_distributed

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
    if source_model is not None:
        source_model = unwrap_model(source_model).eval()
        check_source_model(cfg, source_model.config)
    was_training = model.training
    model.eval()
    bar = console.progress(n, "eval bpd", "img", enabled=progress and rank == 0)
    try:
        totals = nll_sums(model, dataset, chunks, device, num_workers, precision, source_model,
                          advance=lambda images: bar.update(images * world))
    except ValueError as exc:  # the model names what does not fit (size, channels, label range)
        raise RunError(f"{describe(dataset)[0]} does not fit the model: {exc}") from None
    finally:
        bar.close()
        model.train(was_training)
    all_reduce_sum(totals)
    nll_sum, images, source_nll_sum = totals.tolist()
    images = int(round(images))
    description, split = describe(dataset)
    chain = {}
    if source_model is not None:
        source_per_target_dim = bits_per_dim(source_nll_sum / images, cfg.num_dims)
        chain = {
            "source_bpd": bits_per_dim(source_nll_sum / images, source_model.config.num_dims),
            "source_bits_per_target_dim": source_per_target_dim,
            "chain_bpd": bits_per_dim(nll_sum / images, cfg.num_dims) + source_per_target_dim,
        }
    return {
        **chain,
        "bpd": bits_per_dim(nll_sum / images, cfg.num_dims),
        "images": images,
        "dataset": description,
        "split": split,
        "nll_nats": nll_sum / images,
        "dims": cfg.num_dims,
        "precision": precision.name,
        "approximate": precision.bf16,
    }


def check_source_model(model: ModelConfig, source: ModelConfig) -> None:
    """Raise ConfigError unless `source` models exactly the low-resolution inputs of the
    super-resolution model `model`: same size and channels, no input of its own."""
    problems = []
    if model.source_size is None:
        problems.append("--source-model needs a super-resolution checkpoint to evaluate (one with model.source_size)")
    elif source.source_size is not None:
        problems.append("--source-model must be an unconditional model of the low-resolution images, "
                        "not a super-resolution model")
    elif (tuple(source.image_size), source.channels) != (tuple(model.source_size), model.channels):
        (h, w), (sh, sw) = model.source_size, source.image_size
        problems.append(f"--source-model makes {sh}x{sw}x{source.channels} images; this model's inputs are "
                        f"{h}x{w}x{model.channels}: train the source model on images of that size")
    elif source.num_classes and source.num_classes != model.num_classes:
        problems.append(f"--source-model is conditioned on {source.num_classes} classes; this model on "
                        f"{model.num_classes or 'none'}")
    if problems:
        raise ConfigError(problems)


@dataclass
class EvalConfig:
    """What `imagetx eval-bpd` measures: a checkpoint (a file, or a run directory: its newest) on
    a split of the data set it was trained on, or of `dataset` / `data_dir` when given."""

    checkpoint: str | os.PathLike
    dataset: str | None = None  # default: the data set the model was trained on
    data_dir: str | None = None
    split: str = "test"
    limit: int | None = None  # evaluate only the first N images (None: all)
    batch_size: int = 64  # images per forward pass, per process
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    download: bool = False  # fetch the data set through torchvision if missing
    num_workers: int = 0  # DataLoader worker processes
    progress: bool = True  # a progress bar on stderr
    precision: str = "fp32"  # "fp32" (exact), "bf16" (approximate, faster) or "auto" (bf16 where native)
    source_model: str | os.PathLike | None = None  # super-resolution: a model of the inputs (chain-rule total)
    weights: str = "auto"  # "auto" (the moving average when the run kept one), "ema" or "trained" (storage.weights.weights_key)

    def problems(self) -> list[str]:
        p: list[str] = []
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            p.append(f"batch size must be >= 1, got {self.batch_size}")
        p += weights_problems(self.weights)
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            p.append(f"limit must be >= 1, got {self.limit}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            p.append(f"num_workers must be >= 0, got {self.num_workers}")
        return p + device_problems(self.device, "device") + precision_problems(self.precision, "precision")

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)


def run(config: EvalConfig) -> dict:
    """`imagetx eval-bpd`: exact bits/dim of a checkpoint on a data set split. Works under
    torchrun. Returns evaluate_bpd()'s dict plus "checkpoint" and "step". Raises ConfigError for
    an invalid config, CheckpointError, DatasetError or RunError."""
    config.validate()
    path = resolve_checkpoint(config.checkpoint)
    with distributed(config.device) as ctx:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, path, ctx.device, config.weights).eval()
        source_model = source_path = None
        if config.source_model is not None:
            source_path = resolve_checkpoint(config.source_model)
            source_model = model_from_checkpoint(load_checkpoint(source_path), source_path, ctx.device).eval()
            check_source_model(model.config, source_model.config)
        data = data_config_from_checkpoint(ckpt, path, config.dataset, config.data_dir, config.download)
        ds = dataset_for(model.config, data, config.split)
        result = evaluate_bpd(
            model, ds, batch_size=config.batch_size, limit=config.limit, device=ctx.device,
            num_workers=config.num_workers, progress=config.progress,
            precision=resolve_precision(config.precision, ctx.device, "exact bits/dim"),
            source_model=source_model,
        )
        if source_path is not None:
            result["source_model"] = str(source_path)
    if not math.isfinite(result["bpd"]):  # and JSON has no NaN: never print one
        raise RunError(
            f"{path}: bits/dim on {result['dataset']} is {result['bpd']} (the model's outputs are not finite "
            "on these images): this checkpoint cannot be evaluated"
        )
    weights = describe_weights(ckpt, weights_key(ckpt, config.weights, path))
    return {**result, "checkpoint": str(path), "step": int(ckpt["step"]), "weights": weights}
