"""`imagetx train`: one `run(config)` that trains, evaluates, samples and checkpoints.

The run directory describes itself:

    RUN/config.toml                 the resolved configuration
    RUN/metrics.jsonl               one JSON object per line: training rows
                                    {step, loss, train_bpd, lr, grad_norm, images_per_sec, epoch, ...}
                                    and held-out rows {step, eval_bpd, eval_images, eval_split}
    RUN/checkpoints/step-NNNNNNNN.pt
    RUN/samples/step-NNNNNNNN.png   sample grids from a fixed generator (comparable across steps)

The loss is the training objective in bits/dim: mean NLL of the batch / (H*W*C * ln 2). `loss` is
the loss of that step's batch, `train_bpd` its mean over the steps since the previous row; the
held-out number is `eval_bpd`, an exact pass over test images in eval mode.

On CPU a run stopped at any point (even by SIGKILL) and resumed with `resume="auto"` ends with the
same parameters and the same loss curve as an uninterrupted run: the checkpoint holds the optimizer,
schedule, data position (epoch and index into that epoch's permutation) and every generator state.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from imagetx.checkpoint import (
    atomic_write,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    make_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from imagetx.config import RunConfig, save_config
from imagetx.distributed import Dist, all_gather_object, all_reduce_sum, broadcast_object, distributed
from imagetx.errors import RunError
from imagetx.images import display_scale, save_grid
from imagetx.evaluate import LN2, batches, check_compatible, dataset_for, describe, evaluate_bpd, unpack
from imagetx.memory import allocator_in_use, find_fast_allocator
from imagetx.model.config import ConfigError, ModelConfig
from imagetx.model.transformer import ImageTransformer

EXIT_STATUS = {"completed": 0, "time_limit": 0, "interrupted": 130, "terminated": 143}


# ---- schedule and optimizer ----------------------------------------------------------------------
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
    optimizer = cls(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i + 1, t.schedule, t.warmup_steps, t.max_steps)
    )
    return optimizer, scheduler


class Objective(nn.Module):
    """The model with `nll` as its forward pass, so that DDP and torch.compile wrap the loss."""

    def __init__(self, model: ImageTransformer):
        super().__init__()
        self.model = model

    def forward(self, x, labels=None, source=None) -> torch.Tensor:
        return self.model.nll(x, labels=labels, source=source)


# ---- data order ----------------------------------------------------------------------------------
class DataOrder:
    """The order training images are visited in: epoch e is a permutation of range(n) drawn from
    (seed, e). A position (epoch, index) says where the next batch starts, so a resumed run reads
    exactly the images the uninterrupted one would have read."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g))
        return self._cache[1]

    def take(self, epoch: int, index: int, count: int) -> tuple[list[int], int, int]:
        """The next `count` indices from (epoch, index), running into the next epochs as needed
        -> (indices, epoch, index) with the position after them."""
        out: list[int] = []
        while len(out) < count:
            part = self.permutation(epoch)[index : index + count - len(out)].tolist()
            out += part
            index += len(part)
            if index >= self.n:
                epoch, index = epoch + 1, 0
        return out, epoch, index


class RankBatches:
    """Infinite micro-batches of indices for one process, starting at a data position: each
    optimizer step takes the next batch_size * grad_accum * world_size indices; process r takes
    its contiguous slice and splits it into grad_accum micro-batches."""

    def __init__(self, order: DataOrder, epoch: int, index: int, batch_size: int, grad_accum: int, ctx: Dist):
        self.order, self.start = order, (epoch, index)
        self.batch_size, self.grad_accum, self.ctx = batch_size, grad_accum, ctx

    def __iter__(self):
        epoch, index = self.start
        per_rank = self.batch_size * self.grad_accum
        while True:
            idx, epoch, index = self.order.take(epoch, index, per_rank * self.ctx.world_size)
            mine = idx[self.ctx.rank * per_rank : (self.ctx.rank + 1) * per_rank]
            for a in range(self.grad_accum):
                yield mine[a * self.batch_size : (a + 1) * self.batch_size]


# ---- signals -------------------------------------------------------------------------------------
class StopSignals:
    """Turns the first SIGINT / SIGTERM into a request to stop after the current step (the run
    then saves a checkpoint); a second one acts as usual."""

    def __init__(self, announce: bool):
        self.received: int | None = None
        self.announce = announce
        self._old: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        self._restore()
        if self.announce:
            print(
                f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                "(send it again to quit at once)",
                file=sys.stderr,
                flush=True,
            )

    def _restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def __exit__(self, *exc):
        self._restore()


# ---- the run -------------------------------------------------------------------------------------
def run(config: RunConfig, resume: str | os.PathLike | None = None) -> dict:
    """Train as `config` says; under torchrun, one process per GPU (or CPU process) with DDP.

    resume: None (the output directory must be new or empty), "auto" (continue from the newest
    checkpoint in train.out if there is one) or a checkpoint path. The architecture comes from
    the checkpoint; a config whose model section differs raises ConfigError.

    Returns a summary {"status": "completed" | "time_limit" | "interrupted" | "terminated",
    "step", "run_dir", "checkpoint", "train_bpd", "eval_bpd", "minutes"}; EXIT_STATUS maps the
    status to the CLI's exit code. Raises RunError for an unusable output directory or a
    non-finite loss, CheckpointError for an unreadable checkpoint, DatasetError for missing data.
    """
    config.validate()
    with distributed(config.train.device) as ctx:
        return Trainer(config, ctx, resume).train()


def _main_first(ctx: Dist, fn):
    """Run fn on the main process only and share its result with every process. If it fails, the
    main process raises its error and the others a RunError, instead of waiting forever."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    if ctx.is_distributed:
        result, failed = broadcast_object((result, None if error is None else str(error)))
        if failed is not None and error is None:
            raise RunError(f"the main process failed: {failed}")
    if error is not None:
        raise error
    return result


class Trainer:
    """One training run on one process: set-up, the loop, and the files rank 0 writes."""

    def __init__(self, config: RunConfig, ctx: Dist, resume):
        self.config, self.ctx = config, ctx
        self.t = config.train
        self.run_dir = Path(self.t.out)
        self.device = ctx.device
        self.resume = resume

    # ---- set-up --------------------------------------------------------------------------------
    def prepare_run_dir(self) -> Path | None:
        """On the main process: check the output directory and find the checkpoint to resume."""
        out = self.run_dir
        ckpt = None
        if self.resume is not None and str(self.resume) != "auto":
            ckpt = resolve_checkpoint(self.resume)
            newer = [p for s, p in list_checkpoints(out) if p.resolve() != ckpt.resolve() and s > _step_of(ckpt)]
            if newer:
                raise RunError(
                    f"{out} has checkpoints newer than {ckpt} (up to {newer[-1].name}); resume from the "
                    "newest with --resume auto, or choose another --out"
                )
            own_run = ckpt.resolve().parent.parent == out.resolve()
            if not own_run and out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise RunError(
                    f"{out} is not empty and {ckpt} belongs to another run; continue a run from one of "
                    "its own checkpoints, or start from this one in a new --out"
                )
        elif self.resume is not None:
            ckpt = latest_checkpoint(out)
        if self.resume is None and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RunError(
                f"{out} is not empty (it holds an earlier run); pass --resume auto to continue it, "
                "or choose another --out"
            )
        try:  # leaves at most an empty directory behind if the run fails before it starts
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunError(f"cannot write to the output directory {out}: {exc.strerror or exc}") from None
        return ckpt

    def load_data(self):
        model, data = self.config.model, self.config.data
        need_eval = self.t.eval_every > 0 or (self.t.sample_every > 0 and model.source_size is not None)

        def load(download: bool):
            train_set = dataset_for(model, data, "train", download=download)
            eval_set = dataset_for(model, data, data.eval_split, download=download) if need_eval else None
            return train_set, eval_set

        if self.ctx.is_distributed and data.download:
            _main_first(self.ctx, lambda: load(True) and None)  # one process downloads, then all read
        self.train_set, self.eval_set = load(data.download and not self.ctx.is_distributed)
        check_compatible(model, self.train_set)

    def build(self, ckpt: dict | None):
        cfg, t, ctx = self.config, self.t, self.ctx
        torch.manual_seed(t.seed)  # identical initial weights on every process and world size
        self.model = model = ImageTransformer(cfg.model).to(self.device)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        model.set_activation_checkpointing(t.activation_checkpointing)
        objective: nn.Module = Objective(model)
        if ctx.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            objective = DistributedDataParallel(objective, device_ids=ids)
        compile_ = t.compile if isinstance(t.compile, bool) else self.device.type == "cuda"
        self.objective = torch.compile(objective) if compile_ else objective
        self.optimizer, self.scheduler = make_optimizer(model, cfg)
        bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

        self.step, epoch, index = 0, 0, 0
        torch.manual_seed(t.seed + ctx.rank)  # dropout differs across processes
        random.seed(t.seed + ctx.rank)
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.step = int(ckpt["step"])
            pos = ckpt.get("data_position") or {}
            epoch, index = int(pos.get("epoch", 0)), int(pos.get("index", 0))
            if pos.get("dataset_size") != len(self.train_set):
                self.note(
                    f"the training set has {len(self.train_set)} images, the checkpoint saw "
                    f"{pos.get('dataset_size')}: starting a new epoch"
                )
                epoch, index = epoch + 1, 0
            states = ckpt.get("rng") or []
            if len(states) == ctx.world_size:
                set_rng_state(states[ctx.rank])
            else:
                self.note(
                    f"the checkpoint was written by {len(states)} process(es), this run has "
                    f"{ctx.world_size}: generators reseeded, so the run will not repeat exactly"
                )
                torch.manual_seed(t.seed + ctx.rank + 1_000_003 * self.step)
                random.seed(t.seed + ctx.rank + 1_000_003 * self.step)
        self.order = DataOrder(len(self.train_set), t.seed)
        self.epoch, self.index = epoch, index

    def note(self, text: str) -> None:
        if self.ctx.is_main:
            tqdm.write(f"note: {text}", file=sys.stderr)

    def check_resumed_model(self, ckpt: dict, path: Path) -> None:
        saved = ModelConfig.from_dict(dict(ckpt["config"]["model"])).to_dict()
        mine = self.config.model.to_dict()
        diffs = [f"model.{k} = {mine[k]!r} (checkpoint: {saved[k]!r})" for k in mine if mine[k] != saved.get(k)]
        if diffs:
            raise ConfigError(
                [f"the architecture comes from the checkpoint {path}; the config differs: {d}" for d in diffs]
            )

    # ---- files -----------------------------------------------------------------------------------
    def open_metrics(self, resumed_step: int | None):
        path = self.run_dir / "metrics.jsonl"
        kept: list[str] = []
        if resumed_step is not None and path.exists():
            # rows written after the checkpoint (before a crash) are written again by this run
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a row cut off by a crash
                if isinstance(row, dict) and row.get("step", 0) <= resumed_step:
                    kept.append(line)
        atomic_write(path, "".join(f"{line}\n" for line in kept).encode())
        self.metrics = open(path, "a", buffering=1)

    def log(self, row: dict) -> None:
        self.metrics.write(json.dumps(row) + "\n")

    def save(self) -> Path | None:
        """Checkpoint the current step (a collective: every process contributes its generators)."""
        rng = all_gather_object(rng_state())
        self.saved_step = self.step
        if not self.ctx.is_main:
            return None
        ckpt = make_checkpoint(
            model=self.model, config=self.config.to_dict(), step=self.step, optimizer=self.optimizer,
            scheduler=self.scheduler, rng=rng,
            data_position={"epoch": self.epoch, "index": self.index, "dataset_size": len(self.train_set)},
        )
        try:
            path = save_checkpoint(self.run_dir, ckpt, keep=self.t.keep_checkpoints)
        except OSError as exc:
            raise RunError(f"cannot write a checkpoint in {self.run_dir}: {exc.strerror or exc}") from None
        self.last_checkpoint = path
        return path

    def evaluate(self) -> float:
        limit = self.t.eval_images or None
        result = evaluate_bpd(self.model, self.eval_set, self.t.batch_size, limit=limit, device=self.device)
        if self.ctx.is_main:
            self.log({"step": self.step, "eval_bpd": result["bpd"], "eval_images": result["images"],
                      "eval_split": result["split"]})
        self.last_eval = result["bpd"]
        return result["bpd"]

    def write_samples(self) -> Path | None:
        """A grid of sample_count samples from a generator seeded with train.seed (rows of source,
        sample and target for super-resolution)."""
        if not self.ctx.is_main:
            return None
        cfg, n = self.config.model, self.t.sample_count
        labels = source = targets = None
        if cfg.num_classes:
            labels = torch.arange(n, device=self.device) % cfg.num_classes
        if cfg.source_size is not None:
            targets, source, _ = next(batches(self.eval_set, iter([list(range(min(n, len(self.eval_set))))])))
            n = targets.shape[0]
            source = source.to(self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                generator = torch.Generator(self.device).manual_seed(self.t.seed)
                images = self.model.sample(n, labels=labels, source=source, generator=generator).cpu()
        finally:
            self.model.train(was_training)
        nrow = None
        if targets is not None:  # rows of (source enlarged, sample, ground truth)
            H, W = cfg.image_size
            up = torch.nn.functional.interpolate(source.cpu().permute(0, 3, 1, 2).float(), size=(H, W), mode="nearest")
            up = up.to(torch.uint8).permute(0, 2, 3, 1)  # (n, H, W, C)
            images = torch.stack([up, images, targets.cpu().to(torch.uint8)], dim=1).flatten(0, 1)  # (3n, H, W, C)
            nrow = 3 * max(1, int(math.sqrt(n / 3)))
        path = self.run_dir / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(exist_ok=True)
        save_grid(images, path, nrow=nrow, scale=display_scale(cfg.image_size))
        return path

    # ---- the loop --------------------------------------------------------------------------------
    def train_step(self, stream) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches -> (loss, grad norm, lr) on every
        process; loss is in bits/dim averaged over all processes."""
        t, cfg = self.t, self.config.model
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=self.device)
        for a in range(t.grad_accum):
            x, labels, source = unpack(next(stream), cfg, self.device)
            sync = a == t.grad_accum - 1 or not self.ctx.is_distributed
            with (nullcontext() if sync else self.objective.no_sync()), self.autocast():
                nll = self.objective(x, labels=labels, source=source)
                loss = nll.float().mean() / (cfg.num_dims * LN2)
            (loss / t.grad_accum).backward()
            loss_sum += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or float("inf"))
        return loss_sum / t.grad_accum, norm, lr

    def train(self) -> dict:
        t, ctx = self.t, self.ctx
        self.start = time.monotonic()
        ckpt_path = _main_first(ctx, self.prepare_run_dir)
        ckpt = None
        if ckpt_path is not None:
            ckpt = load_checkpoint(ckpt_path)
            self.check_resumed_model(ckpt, ckpt_path)
        self.load_data()
        self.build(ckpt)
        del ckpt
        self.last_checkpoint, self.last_eval, self.train_bpd = ckpt_path, None, None
        self.saved_step = self.step if ckpt_path is not None else None
        if ctx.is_main:
            save_config(self.config, self.run_dir / "config.toml")
            self.open_metrics(self.step if ckpt_path is not None else None)
            self.announce(ckpt_path)

        stream = iter(self._stream())
        per_step = t.batch_size * t.grad_accum * ctx.world_size
        self.window: list[float] = []  # losses since the last metrics row
        self.window_time = 0.0
        status = "completed"
        self.bar = tqdm(
            total=t.max_steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True,
            disable=not (ctx.is_main and sys.stderr.isatty()),
        )
        try:
            with StopSignals(announce=ctx.is_main) as signals:
                while self.step < t.max_steps:
                    tick = time.perf_counter()
                    loss, norm, lr = self.train_step(stream)
                    out_of_time = t.max_minutes > 0 and time.monotonic() - self.start > 60 * t.max_minutes
                    # one collective per step: the mean loss, and whether any process must stop
                    stop = [float(signals.received is not None), float(out_of_time)]
                    flags = all_reduce_sum(torch.cat([loss.float().view(1), torch.tensor(stop, device=self.device)]))
                    loss_value, norm_value = flags[0].item() / ctx.world_size, float(norm)
                    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                        self.stop_on_nonfinite(loss_value, norm_value)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    self.epoch, self.index = self._advance(per_step)
                    self.window.append(loss_value)
                    self.window_time += time.perf_counter() - tick
                    last = self.step == t.max_steps
                    self.progress(loss_value, norm_value, lr, per_step, log=self.step % t.log_every == 0 or last)
                    if flags[1].item():
                        status = "terminated" if signals.received == signal.SIGTERM else "interrupted"
                        break
                    if flags[2].item():
                        status = "time_limit"
                        break
                    self.periodic(last)
                if self.saved_step != self.step:
                    self.save()
        finally:
            self.bar.close()
            if ctx.is_main and hasattr(self, "metrics"):
                self.metrics.close()
        summary = {
            "status": status, "step": self.step, "run_dir": str(self.run_dir),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "train_bpd": self.train_bpd, "eval_bpd": self.last_eval,
            "minutes": (time.monotonic() - self.start) / 60,
        }
        if ctx.is_main:
            self.report(summary)
        return summary

    def progress(self, loss: float, norm: float, lr: float, per_step: int, log: bool) -> None:
        """Update the progress bar; on log steps, write a metrics row (and a line when stderr is not
        a terminal)."""
        speed = per_step * len(self.window) / max(self.window_time, 1e-9)
        if self.ctx.is_main:
            self.bar.update(1)
            self.bar.set_postfix_str(f"bpd {loss:.3f} lr {lr:.2e} img/s {speed:.0f}", refresh=False)
        if not log:
            return
        self.train_bpd = sum(self.window) / len(self.window)
        if self.ctx.is_main:
            self.log({
                "step": self.step, "loss": loss, "train_bpd": self.train_bpd, "lr": lr, "grad_norm": norm,
                "images_per_sec": speed, "epoch": self.epoch, "elapsed_s": round(time.monotonic() - self.start, 3),
            })
            if self.bar.disable:
                print(
                    f"step {self.step}/{self.t.max_steps}  loss {loss:.4f} bits/dim  lr {lr:.3g}  "
                    f"grad norm {norm:.3g}  {speed:.0f} img/s",
                    file=sys.stderr, flush=True,
                )
        self.window, self.window_time = [], 0.0

    def periodic(self, last: bool) -> None:
        """Held-out bits/dim, sample grids and checkpoints, each every N steps (and at the end)."""
        t, step = self.t, self.step
        if t.eval_every and self.eval_set is not None and (step % t.eval_every == 0 or last):
            self.evaluate()
        if t.sample_every and t.sample_count and (step % t.sample_every == 0 or last):
            self.write_samples()
        if t.checkpoint_every and step % t.checkpoint_every == 0 and not last:
            self.save()  # the last one is written after the loop, whatever ended it

    def _advance(self, count: int) -> tuple[int, int]:
        """The data position after `count` more images (without materialising them)."""
        total = self.epoch * self.order.n + self.index + count
        return total // self.order.n, total % self.order.n

    def _stream(self):
        ds = self.train_set
        index_lists = RankBatches(self.order, self.epoch, self.index, self.t.batch_size, self.t.grad_accum, self.ctx)
        return batches(ds, iter(index_lists), self.config.data.num_workers, seed=self.t.seed + self.ctx.rank)

    def stop_on_nonfinite(self, loss: float, norm: float):
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
        kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
        raise RunError(
            f"{what} at step {self.step + 1}: training stopped, nothing saved for this step; {kept}. "
            "Try a lower train.lr, more train.warmup_steps or train.grad_clip"
        )

    def announce(self, resumed: Path | None) -> None:
        t, ctx = self.t, self.ctx
        print(self.config.to_toml(), file=sys.stderr)
        n_params = sum(p.numel() for p in self.model.parameters())
        what = f"resuming from {resumed} (step {self.step})" if resumed else "starting a new run"
        print(
            f"{what} in {self.run_dir}: {n_params / 1e6:.2f}M parameters, {ctx.world_size} process(es) on "
            f"{self.device.type} (memory allocator: {allocator_in_use()}), "
            f"{len(self.train_set)} training images ({describe(self.train_set)[0]}), "
            f"{t.batch_size * t.grad_accum * ctx.world_size} images per step",
            file=sys.stderr, flush=True,
        )
        if self.device.type == "cpu" and allocator_in_use() == "system" and find_fast_allocator() is None:
            print(
                "note: CPU training is 10-15% faster with tcmalloc: install libtcmalloc-minimal4 "
                "(Debian/Ubuntu) and the imagetx command preloads it",
                file=sys.stderr, flush=True,
            )

    def report(self, summary: dict) -> None:
        text = {
            "completed": "finished", "time_limit": f"stopped after train.max_minutes = {self.t.max_minutes}",
            "interrupted": "interrupted", "terminated": "terminated",
        }[summary["status"]]
        bpd = f", held-out {summary['eval_bpd']:.4f} bits/dim" if summary["eval_bpd"] is not None else ""
        print(
            f"{text} at step {summary['step']}{bpd}; checkpoint {summary['checkpoint']}",
            file=sys.stderr, flush=True,
        )


def _step_of(path: Path) -> int:
    name = Path(path).name
    try:
        return int(name.removeprefix("step-").removesuffix(".pt"))
    except ValueError:
        return -1
