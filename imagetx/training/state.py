"""What a training run checkpoints: one TrainState, whose state_dict() is the checkpoint and whose
load_state_dict() restores every part of it, so that saving and resuming mirror each other in one
place. A run resumed from it repeats the uninterrupted run exactly (tests/commands/test_train.py)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imagetx.errors import CheckpointError
from imagetx.storage.checkpoint import make_checkpoint, set_rng_state
from imagetx.storage.weights import load_weights
from imagetx.training.optim import Cooldown, WeightAverage

# a run whose generators cannot be restored reseeds them from the step, apart from a fresh run's
_RESEED_STRIDE = 1_000_003


@dataclass
class TrainState:
    """The parts of a run that change as it trains: the model, its optimizer, learning-rate
    schedule and planned cooldown, the moving average of its weights (None when train.ema is
    off), the optimizer steps taken and the data position (epoch, index into that epoch's
    permutation)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cooldown: Cooldown
    ema: WeightAverage | None = None
    step: int = 0
    epoch: int = 0
    index: int = 0

    def state_dict(self, config: Mapping, rng: list, dataset_size: int) -> dict:
        """The checkpoint of this state. config: RunConfig.to_dict(); rng: every process's
        generator states (storage.checkpoint.rng_state), by rank."""
        return make_checkpoint(
            model=self.model, config=config, step=self.step, optimizer=self.optimizer, scheduler=self.scheduler,
            cooldown=self.cooldown.state_dict(), rng=rng, ema=self.ema.module if self.ema is not None else None,
            data_position={"epoch": self.epoch, "index": self.index, "dataset_size": dataset_size},
        )

    def load_state_dict(self, ckpt: Mapping, path: str | Path, *, dataset_size: int, rank: int, world_size: int,
                        seed: int) -> list[str]:
        """Restore what state_dict() saved, read from `path`; this process's generators too (the
        state of `rank` when the checkpoint has one per process of this world size). Returns the
        notes for the user: what could not be restored as it was, and what was done instead.
        Raises CheckpointError when the weights or the optimizer state do not fit the model."""
        notes = []
        load_weights(self.model, ckpt, path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: its optimizer state does not fit the model ({exc})") from None
        self.step = int(ckpt["step"])
        planned = ckpt.get("cooldown") or {}
        if not self.cooldown.load_state_dict(planned) and planned.get("by_time"):
            notes.append(f"train.cooldown is {self.cooldown.fraction}, the checkpoint planned its fall for "
                         f"{planned.get('fraction')}: it is planned afresh")
        if self.ema is not None:
            if isinstance(ckpt.get("ema"), dict):
                load_weights(self.ema.module, ckpt, path, key="ema")
            else:  # the average starts at the checkpoint's weights
                self.ema.module.load_state_dict(self.model.state_dict())
                notes.append("the checkpoint holds no moving average of the weights (train.ema): it starts from its weights")
            self.ema.resume_at(self.step)
        pos = ckpt.get("data_position") or {}
        self.epoch, self.index = int(pos.get("epoch", 0)), int(pos.get("index", 0))
        if pos.get("dataset_size") != dataset_size:
            notes.append(f"the training set has {dataset_size} images, the checkpoint saw "
                         f"{pos.get('dataset_size')}: starting a new epoch")
            self.epoch, self.index = self.epoch + 1, 0
        states = ckpt.get("rng") or []
        if len(states) == world_size:
            set_rng_state(states[rank])
        else:
            notes.append(f"the checkpoint was written by {len(states)} process(es), this run has "
                         f"{world_size}: generators reseeded, so the run will not repeat exactly")
            torch.manual_seed(seed + rank + _RESEED_STRIDE * self.step)
            random.seed(seed + rank + _RESEED_STRIDE * self.step)
        return notes
