"""Tiny training runs and what they wrote (metrics rows, the loss curve)."""

from __future__ import annotations

import json
from pathlib import Path

from imagetx.config import RunConfig, load_config
from support.configs import TINY_MODEL


# A model small enough that a step takes milliseconds, on 8x8 grayscale builtin shapes.
TINY = [
    *TINY_MODEL, "model.dropout=0.1",
    "train.batch_size=4", "train.warmup_steps=3", "train.log_every=1",
    "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=5", "train.keep_checkpoints=0",
]


def tiny(out: Path, *extra: str) -> RunConfig:
    return load_config(sets=[*TINY, f"train.out={out}", *extra])


def rows(run_dir: Path, key: str = "loss") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def curve(run_dir: Path) -> list[tuple]:
    """The deterministic part of the training rows (not the timings)."""
    return [(r["step"], r["loss"], r["train_bpd"], r["lr"], r["grad_norm"], r["epoch"]) for r in rows(run_dir)]
