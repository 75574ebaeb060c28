"""The optimizer and the learning-rate schedule of `imagetx train`.

`make_optimizer` builds Adam or AdamW from `train.*` and a LambdaLR scheduler stepped once per
optimizer step; `lr_factor` is the schedule itself: a linear warmup, then rsqrt (as published),
cosine or constant, times `Cooldown`'s linear fall to 0 over the end of the run (train.cooldown).
"""

from __future__ import annotations

import copy

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


class Cooldown:
    """train.cooldown (ours, not in the paper): the learning rate falls linearly to 0 over the
    last `fraction` of the run, on top of the schedule. Annealing at the end of a run lowers the
    final loss (Zhai et al. 2022, Hägele et al. 2024), where rsqrt alone never anneals.

    The run's length is max_steps, or max_minutes when that limit comes first. In steps the fall
    covers the last round(fraction * max_steps) steps. In time, the first step after
    (1 - fraction) * max_minutes begins it (`plan_by_time`), and its end is the step count the
    rate so far reaches in the remaining time; the run then ends there. Once fixed, (start, end)
    is saved in every checkpoint (`state_dict`), so a resumed run repeats the same rates."""

    def __init__(self, fraction: float, max_steps: int):
        self.fraction = fraction
        self.start = self.end = None  # the fall covers optimizer steps start + 1 .. end
        if fraction > 0:
            self.start, self.end = max_steps - max(round(fraction * max_steps), 1), max_steps
        self.by_time = False

    def factor(self, step: int) -> float:
        """Multiplier of the learning rate of optimizer step `step` (1-based)."""
        if self.start is None or step <= self.start:
            return 1.0
        return max(self.end - step + 1, 0) / (self.end - self.start + 1)

    def due_by_time(self, step: int, elapsed_s: float, max_minutes: float) -> bool:
        """Whether the time limit's share of the fall has come after optimizer step `step` with
        the fall neither planned by time nor begun by the step plan."""
        begun = self.by_time or (self.start is not None and step >= self.start)
        return self.fraction > 0 and max_minutes > 0 and not begun and elapsed_s > (1 - self.fraction) * 60 * max_minutes

    def plan_by_time(self, step: int, steps_in_this_process: int) -> None:
        """Begin the fall after optimizer step `step`: it lasts as many steps as this process's
        rate so far gives in the remaining fraction of the time (ending at max_steps at the
        latest)."""
        length = max(round(steps_in_this_process * self.fraction / (1 - self.fraction)), 1)
        self.start, self.by_time = step, True
        self.end = min(step + length, self.end) if self.end is not None else step + length

    def state_dict(self) -> dict:
        return {"fraction": self.fraction, "start": self.start, "end": self.end, "by_time": self.by_time}

    def load_state_dict(self, state: dict | None) -> bool:
        """Take a checkpoint's plan if the time limit made it for the same fraction -> whether
        it did (a plan in steps follows the config's max_steps, which a resumed run may raise)."""
        if not state or not state.get("by_time") or state.get("fraction") != self.fraction:
            return False
        self.start, self.end, self.by_time = state["start"], state["end"], True
        return True


def make_optimizer(model: nn.Module, config: RunConfig):
    """(optimizer, scheduler, cooldown) as configured; the scheduler is stepped once per
    optimizer step and reads the cooldown's plan when it does."""
    t = config.train
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    params = list(model.parameters())
    # the fused kernel updates every parameter in one pass per tensor (CPU and CUDA; the default
    # on CPU is one operator per update term); deterministic, so a resumed run stays bit-exact
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = cls(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, fused=fused)
    cooldown = Cooldown(t.cooldown, t.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i + 1, t.schedule, t.warmup_steps, t.max_steps) * cooldown.factor(i + 1)
    )
    return optimizer, scheduler, cooldown


def ema_decay(step: int, decay: float) -> float:
    """The moving average's decay after optimizer step `step` (1-based): `decay`, held lower at
    first by the usual warm-up (1 + step) / (10 + step) so that the random initial weights are
    forgotten within the first hundred steps, not the first few thousand."""
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightAverage:
    """An exponential moving average of a model's weights (train.ema; Polyak averaging, as in
    PixelCNN++): after optimizer step t, avg = d_t avg + (1 - d_t) weights with d_t = ema_decay(t).

    `module` is a copy of the model holding the average, used for held-out evaluation and sample
    grids and saved in every checkpoint as "ema"; its buffers are the model's (constant tables,
    copied once). The step count is host data, so an update reads nothing back from the device
    (torch.optim.swa_utils.AveragedModel keeps it in a device tensor and reads it every step).
    Deterministic: a resumed run's average is bit-exact."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)  # starts at the initial weights
        self.steps = 0  # optimizer steps folded in

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold in `model`'s weights after an optimizer step."""
        self.steps += 1
        averaged = list(self.module.parameters())
        current = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - ema_decay(self.steps, self.decay))

    def resume_at(self, step: int) -> None:
        """Continue after optimizer step `step` (the average's weights loaded into `module`)."""
        self.steps = step
