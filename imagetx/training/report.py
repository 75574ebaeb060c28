"""What a training run says on stderr before its first step and after its last one."""

from __future__ import annotations

import sys
from pathlib import Path

from imagetx import console
from imagetx.config import RunConfig
from imagetx.data.batches import describe
from imagetx.data.cache import cache_entry
from imagetx.system.allocator import allocator_in_use, find_fast_allocator
from imagetx.system.distributed import Dist
from imagetx.system.precision import Precision
from imagetx.training.optim import Cooldown
from imagetx.training.state import TrainState

def announce(config: RunConfig, ctx: Dist, state: TrainState, run_dir: Path, train_set, precision: Precision,
             resumed: Path | None) -> None:
    """A short summary of the run (the full config: RUN/config.toml, or `imagetx train --show-config`)."""
    t, m = config.train, config.model
    n_params = sum(p.numel() for p in state.model.parameters())
    what = f"resuming from {resumed} (step {state.step})" if resumed else "starting a new run"
    entry = cache_entry(train_set)
    mapped = f"; memory-mapped from {entry}" if entry is not None else ""
    print(
        f"{what} in {run_dir}: {precision.describe()}\n"
        f"  model: {m.attention} attention, {m.n_layers} layers, d {m.d_model}, {m.output} output, "
        f"{n_params / 1e6:.2f}M parameters\n"
        f"  data: {len(train_set)} training images ({describe(train_set)[0]}{mapped}), "
        f"{t.batch_size * t.grad_accum * ctx.world_size} images per step, {t.max_steps} steps\n"
        f"  optimizer: {t.optimizer}, lr {t.lr:g}, {t.schedule} after {t.warmup_steps} warmup steps"
        f"{describe_cooldown(state.cooldown, t.max_minutes)}\n"
        f"  compute: {ctx.world_size} process(es) on {ctx.device.type} (memory allocator: "
        f"{allocator_in_use()}); config {run_dir / 'config.toml'}",
        file=sys.stderr, flush=True,
    )
    if ctx.device.type == "cpu" and allocator_in_use() == "system" and find_fast_allocator() is None:
        console.note(
            "CPU training is 10-15% faster with tcmalloc: install libtcmalloc-minimal4 "
            "(Debian/Ubuntu) and the imagetx command preloads it"
        )


def describe_cooldown(cooldown: Cooldown, max_minutes: float) -> str:
    """How train.cooldown ends the schedule, for the run's first lines ("" when it is off)."""
    if cooldown.start is None:
        return ""
    if cooldown.by_time:
        return f", falling linearly to 0 from step {cooldown.start} to step {cooldown.end} (train.cooldown, planned)"
    limit = ", or of train.max_minutes if that comes first" if max_minutes > 0 else ""
    return f", then falling linearly to 0 over the last {cooldown.fraction:.0%} of train.max_steps{limit}"


def report(summary: dict, max_minutes: float) -> None:
    """The run's last line: how it ended, its held-out bits/dim, its checkpoint (train.run's summary)."""
    text = {
        "completed": "finished", "time_limit": f"stopped after train.max_minutes = {max_minutes}",
        "interrupted": "interrupted", "terminated": "terminated",
    }[summary["status"]]
    bpd = ""
    if summary["eval_bpd"] is not None:
        when = f" at step {summary['eval_step']}" if summary["eval_step"] != summary["step"] else ""
        bpd = f", held-out {summary['eval_bpd']:.4f} bits/dim{when}"
    print(f"{text} at step {summary['step']}{bpd}; checkpoint {summary['checkpoint']}", file=sys.stderr, flush=True)
