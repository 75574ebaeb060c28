"""The optimizer and the learning-rate schedule of `imagetx train`.

`make_optimizer` builds Adam or AdamW from `train.*` and a LambdaLR scheduler stepped once per
optimizer step; `lr_factor` is the schedule itself: a linear warmup, then rsqrt (as published),
cosine or constant.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imagetx.config import RunConfig


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of train.lr at optimizer step `step` (1-based): a linear warmup to 1 over
    warmup_steps, then "rsqrt" (sqrt(warmup / step), as published), "cosine" (to 0 at max_steps)
    or "constant"."""
    if step <= warmup_steps:
        return step / warmup_steps
    if schedule == "rsqrt":
        return math.sqrt(max(warmup_steps, 1) / step)
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def make_optimizer(model: nn.Module, config: RunConfig):
    """(optimizer, scheduler) as configured; the scheduler is stepped once per optimizer step."""
    t = config.train
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    params = list(model.parameters())
    # the fused kernel updates every parameter in one pass per tensor (CPU and CUDA; the default
    # on CPU is one operator per update term); deterministic, so a resumed run stays bit-exact
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = cls(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i + 1, t.schedule, t.warmup_steps, t.max_steps)
    )
    return optimizer, scheduler


def ema_decay(step: int, decay: float) -> float:
    """The moving average's decay after optimizer step `step` (1-based): `decay`, held lower at
    first by the usual warm-up (1 + step) / (10 + step) so that the random initial weights are
    forgotten within the first hundred steps, not the first few thousand."""
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightAverage:
    """An exponential moving average of a model's weights (train.ema; Polyak averaging, as in
    PixelCNN++): after optimizer step t, avg = d_t avg + (1 - d_t) weights with d_t = ema_decay(t).

    `module` is a copy of the model holding the average (torch.optim.swa_utils.AveragedModel),
    used for held-out evaluation and sample grids and saved in every checkpoint as "ema"; its
    buffers follow the model's. Deterministic: a resumed run's average is bit-exact."""

    def __init__(self, model: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel

        @torch.no_grad()
        def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
            torch._foreach_lerp_(averaged, current, 1.0 - ema_decay(int(n), decay))

        self.averaged = AveragedModel(model, multi_avg_fn=update)
        self.averaged.update_parameters(model)  # the first call copies: the average starts at the initial weights
        self.module = self.averaged.module.eval().requires_grad_(False)

    def update(self, model: nn.Module) -> None:
        """Fold in `model`'s weights after an optimizer step."""
        self.averaged.update_parameters(model)

    def resume_at(self, step: int) -> None:
        """Continue after optimizer step `step` (the average's weights loaded into `module`)."""
        self.averaged.n_averaged.fill_(step + 1)
