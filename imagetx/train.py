"""`imagetx train`: one `run(config)` that trains, evaluates, samples and checkpoints: the loop.

What it writes and how a run resumes live in imagetx.training.rundir (config.toml, metrics.jsonl,
checkpoints/, samples/), the optimizer and schedule in imagetx.training.optim, the order images are read
in in imagetx.data.order, Ctrl-C / SIGTERM handling in imagetx.training.signals. metrics.jsonl holds
training rows {step, loss, train_bpd, lr, grad_norm, images_per_sec, epoch, ...} and held-out
rows {step, eval_bpd, eval_images, eval_split, eval_dataset, elapsed_s}. With train.logger the same
numbers also go to TensorBoard or W&B (imagetx.training.loggers); RUN/curves.png is redrawn at each evaluation.

The loss is the training objective in bits/dim: mean NLL of the batch / (H*W*C * ln 2). `loss` is
the loss of that step's batch, `train_bpd` its mean over the steps since the previous row; the
held-out number is `eval_bpd`, an exact pass over test images in eval mode.

On CPU a run stopped at any point (even by SIGKILL) and resumed with `resume="auto"` ends with the
same parameters and the same loss curve as an uninterrupted run: the checkpoint holds the optimizer,
schedule, data position (epoch and index into that epoch's permutation) and every generator state.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from imagetx import console
from imagetx.config import RunConfig
from imagetx.data.batches import batches, check_compatible, dataset_for, unpack
from imagetx.data.order import DataOrder, RankBatches
from imagetx.errors import RunError
from imagetx.eval_bpd import evaluate_bpd
from imagetx.model.transformer import ImageTransformer
from imagetx.storage.checkpoint import rng_state
from imagetx.system.distributed import Dist, all_gather_object, all_reduce_sum, distributed, main_first, node_main_first
from imagetx.system.paths import cache_root
from imagetx.system.precision import float32_matmuls, training_matmuls
from imagetx.system.precision import resolve as resolve_precision
from imagetx.system.compiling import compile_or_eager
from imagetx.training.loggers import Logger, check_installed, make_logger
from imagetx.training.metrics import bits_per_dim
from imagetx.training.optim import WeightAverage, make_optimizer
from imagetx.training.report import announce, report
from imagetx.training.rundir import RunDir, resume_from
from imagetx.training.signals import StopSignals
from imagetx.training.state import TrainState

EXIT_STATUS = {"completed": 0, "time_limit": 0, "interrupted": 130, "terminated": 143}


class Objective(nn.Module):
    """The model with `nll` as its forward pass, so that DDP and torch.compile wrap the loss."""

    def __init__(self, model: ImageTransformer):
        super().__init__()
        self.model = model

    def forward(self, x, labels=None, source=None) -> torch.Tensor:
        return self.model.nll(x, labels=labels, source=source)


# ---- the run -------------------------------------------------------------------------------------
def run(config: RunConfig, resume: str | os.PathLike | None = None) -> dict:
    """Train as `config` says; under torchrun, one process per GPU (or CPU process) with DDP.

    resume: None (the output directory must be new or empty), "auto" (continue from the newest
    checkpoint in train.out if there is one) or a checkpoint path. The architecture comes from
    the checkpoint, as with `imagetx train --resume`: see imagetx.training.rundir.resume_from.

    Returns a summary {"status": "completed" | "time_limit" | "interrupted" | "terminated",
    "step", "run_dir", "checkpoint", "train_bpd", "eval_bpd", "eval_step", "minutes"} (eval_step:
    the step of eval_bpd, the last one unless a signal stopped the run); EXIT_STATUS maps the
    status to the CLI's exit code. Raises RunError for an unusable output directory or a
    non-finite loss, CheckpointError for an unreadable checkpoint, DatasetError for missing data.
    """
    config.validate()
    config, path, ckpt = resume_from(config, resume)
    check_installed(config.train.logger)  # one line naming the pip command, before any work
    with distributed(config.train.device) as ctx:
        trainer = Trainer(config, ctx)
        try:
            trainer.set_up(resume, path, ckpt)
            del ckpt  # the model and optimizer hold their own copies now
            return trainer.train()
        finally:
            trainer.run_dir.unlock()


class Trainer:
    """One training run on one process: set-up, the loop, and the files rank 0 writes."""

    def __init__(self, config: RunConfig, ctx: Dist):
        self.config, self.ctx = config, ctx
        self.t = config.train
        self.run_dir = RunDir(self.t.out)
        self.device = ctx.device
        self.curves_failed = False  # RUN/curves.png could not be drawn (warned once)
        self.logger = Logger()  # train.logger's, on the main process (imagetx.training.loggers)

    # ---- set-up --------------------------------------------------------------------------------
    def load_data(self):
        model, data = self.config.model, self.config.data
        need_eval = self.t.eval_every > 0 or (self.t.sample_every > 0 and model.source_size is not None)

        def load(download: bool):
            train_set = dataset_for(model, data, "train", download=download)
            eval_set = dataset_for(model, data, data.eval_split, download=download) if need_eval else None
            return train_set, eval_set

        if self.ctx.is_distributed and data.download:
            main_first(self.ctx, lambda: load(True) and None)  # one process downloads, then all read
        if self.ctx.is_distributed and cache_root(data.cache_dir) is not None and data.name != "builtin":
            node_main_first(self.ctx, lambda: load(False))  # one process per node fills the data cache
        self.train_set, self.eval_set = load(data.download and not self.ctx.is_distributed)
        check_compatible(model, self.train_set)

    def build(self, ckpt: dict | None, ckpt_path: Path | None = None):
        cfg, t, ctx = self.config, self.t, self.ctx
        torch.manual_seed(t.seed)  # identical initial weights on every process and world size
        model = ImageTransformer(cfg.model).to(self.device)
        model.set_activation_checkpointing(t.activation_checkpointing)
        optimizer, scheduler, cooldown = make_optimizer(model, cfg)
        ema = WeightAverage(model, t.ema) if t.ema > 0 else None
        self.state = state = TrainState(model, optimizer, scheduler, cooldown, ema)
        torch.manual_seed(t.seed + ctx.rank)  # dropout differs across processes
        random.seed(t.seed + ctx.rank)
        if ckpt is not None:
            for text in state.load_state_dict(ckpt, ckpt_path, dataset_size=len(self.train_set), rank=ctx.rank,
                                              world_size=ctx.world_size, seed=t.seed):
                self.note(text)
        objective: nn.Module = Objective(model)
        if ctx.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # every buffer of the model is a constant table built at construction: broadcasting
            # them from rank 0 before each forward pass (DDP's default) would copy tens of MB for nothing
            # gradients as views of the all-reduce buckets: no second copy of every gradient
            objective = DistributedDataParallel(objective, device_ids=ids, broadcast_buffers=False,
                                                gradient_as_bucket_view=True)
        compile_ = t.compile if isinstance(t.compile, bool) else self.device.type == "cuda"
        self.objective = compile_or_eager(objective, self.device) if compile_ else objective
        self.precision = resolve_precision(t.precision, self.device)
        self.autocast = lambda: self.precision.autocast(self.device)
        self.order = DataOrder(len(self.train_set), t.seed)
        self.first_step = state.step  # where this process started: the time plan counts from here

    def note(self, text: str) -> None:
        console.note(text)

    # ---- files -----------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint the current step (a collective: every process contributes its generators)."""
        rng = all_gather_object(rng_state())
        self.saved_step = self.state.step
        if not self.ctx.is_main:
            return None
        ckpt = self.state.state_dict(self.config.to_dict(), rng, len(self.train_set))
        path = self.run_dir.save_checkpoint(ckpt, keep=self.t.keep_checkpoints)
        self.last_checkpoint = path
        return path

    def evaluate(self) -> float:
        limit = self.t.eval_images or None
        with float32_matmuls("highest"):  # exact, as `imagetx eval-bpd` measures it
            result = evaluate_bpd(self.inference_model, self.eval_set, self.t.batch_size, limit=limit, device=self.device)
        if self.ctx.is_main:
            self.run_dir.log({"step": self.state.step, "eval_bpd": result["bpd"], "eval_images": result["images"],
                      "eval_split": result["split"], "eval_dataset": result["dataset"],
                      "elapsed_s": round(time.monotonic() - self.start, 3)})
            self.logger.scalars(self.state.step, {"eval/bpd": result["bpd"]})
            self.refresh_curves()
        self.last_eval, self.last_eval_step = result["bpd"], self.state.step
        return result["bpd"]

    @property
    def inference_model(self) -> nn.Module:
        """What held-out evaluations and sample grids use: the moving average when train.ema is on."""
        return self.state.ema.module if self.state.ema is not None else self.state.model

    def refresh_curves(self) -> None:
        """Redraw RUN/curves.png. A picture never stops training: a failure is one warning per run."""
        from imagetx.plot import refresh_curves

        try:
            refresh_curves(self.run_dir.path)
        except Exception as exc:  # matplotlib missing or broken, disk full...
            if not self.curves_failed:
                console.warn(f"could not draw {self.run_dir.path / 'curves.png'} ({exc}); training goes on")
            self.curves_failed = True

    # ---- the loop --------------------------------------------------------------------------------
    def train_step(self, stream) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches -> (loss, grad norm, lr) on every
        process; loss is in bits/dim averaged over all processes."""
        t, cfg = self.t, self.config.model
        lr = self.state.optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=self.device)
        for a in range(t.grad_accum):
            x, labels, source = unpack(next(stream), cfg, self.device)
            sync = a == t.grad_accum - 1 or not self.ctx.is_distributed
            with (nullcontext() if sync else self.objective.no_sync()), self.autocast():
                nll = self.objective(x, labels=labels, source=source)
                loss = bits_per_dim(nll.float().mean(), cfg.num_dims)
            (loss / t.grad_accum).backward()
            loss_sum += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(self.state.model.parameters(), t.grad_clip or float("inf"))
        return loss_sum / t.grad_accum, norm, lr

    def set_up(self, resume: str | os.PathLike | None, ckpt_path: Path | None, ckpt: dict | None) -> None:
        """Check the run directory, load the data, build the model and optimizer (from `ckpt`,
        read from ckpt_path, when resuming) and start config.toml and metrics.jsonl."""
        ctx = self.ctx
        self.start = time.monotonic()
        step = int(ckpt["step"]) if ckpt is not None else None
        steps = all_gather_object(step)
        if len(set(steps)) > 1:  # e.g. a node that cannot see the run directory would start afresh
            found = ", ".join(f"process {r}: {'step ' + str(s) if s is not None else 'none'}" for r, s in enumerate(steps))
            raise RunError(
                f"the processes found different checkpoints to resume from in {self.t.out} ({found}); "
                "every node must see the same run directory: put --out on a file system they share"
            )
        main_first(ctx, lambda: self.run_dir.prepare(resume, ckpt_path, step))
        self.load_data()
        self.build(ckpt, ckpt_path)
        self.last_checkpoint, self.last_eval, self.last_eval_step, self.train_bpd = ckpt_path, None, None, None
        self.saved_step = self.state.step if ckpt_path is not None else None
        if ctx.is_main:
            self.run_dir.start(self.config, self.state.step if ckpt_path is not None else None)
            self.logger = make_logger(self.t.logger, self.run_dir.path, self.config)
            announce(self.config, self.ctx, self.state, self.run_dir.path, self.train_set, self.precision, ckpt_path)

    def train(self) -> dict:
        """The loop, until train.max_steps, the time limit or a signal -> the summary.

        Nothing is read back from the device at a step except where something needs it: the
        losses and gradient norms of the steps since the last read stay on the device until a
        metrics row, a held-out evaluation, a sample grid or a checkpoint (settle), which also
        stops the run if any of them was not finite. Until then the fused optimizer skips a
        non-finite step's update on the device (found_inf, as torch's GradScaler has it skip
        one), so no weight a later checkpoint could hold was touched by it. Under torchrun the
        processes' stop flags travel with the loss in one all-reduce per step, read a step later
        (when the device has long finished it), so every process acts on them at the same step.
        """
        t, ctx, s = self.t, self.ctx, self.state
        stream = iter(self._stream())
        per_step = t.batch_size * t.grad_accum * ctx.world_size
        self.window: list[tuple[torch.Tensor, torch.Tensor]] = []  # (loss, grad norm) since the last read
        self.window_time = 0.0
        self.read: list[list[float]] = []  # (loss, grad norm) read since the last metrics row
        skips_on_device = bool(s.optimizer.defaults.get("fused"))  # takes found_inf
        agreed = None  # torchrun: the last step's all-reduced loss and stop flags
        status = "completed"
        self.bar = tqdm(
            total=self.last_step, initial=s.step, unit="step", file=sys.stderr, dynamic_ncols=True,
            disable=not (ctx.is_main and sys.stderr.isatty()),
        )
        try:
            with StopSignals(announce=ctx.is_main) as signals, training_matmuls(self.precision, self.device):
                while s.step < self.last_step:
                    tick = time.perf_counter()
                    loss, norm, lr = self.train_step(stream)
                    elapsed = time.monotonic() - self.start
                    out_of_time = t.max_minutes > 0 and elapsed > 60 * t.max_minutes
                    cool_down = s.cooldown.due_by_time(s.step + 1, elapsed, t.max_minutes)
                    # whether any process must stop, and whether the time limit's cooldown begins
                    stop = [float(signals.received is not None), float(out_of_time), float(cool_down)]
                    if ctx.is_distributed:  # the mean loss and the flags in one collective
                        flags = torch.tensor([0.0, *stop])
                        flags = (flags.pin_memory() if self.device.type == "cuda" else flags).to(self.device, non_blocking=True)
                        flags[0] = loss.float()
                        all_reduce_sum(flags)
                        loss = flags[0] / ctx.world_size
                        stop, agreed = ([0.0] * 3 if agreed is None else agreed.tolist()[1:]), flags
                    if skips_on_device:
                        s.optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
                    else:  # an optimizer that cannot skip on the device: checked before it steps
                        self.check_finite([(loss, norm)], s.step + 1)
                    s.optimizer.step()
                    if s.ema is not None:
                        s.ema.update(s.model)
                    if stop[2]:
                        self.plan_cooldown()
                    s.scheduler.step()
                    s.optimizer.zero_grad(set_to_none=True)
                    s.step += 1
                    s.epoch, s.index = self.order.advance(s.epoch, s.index, per_step)
                    self.window.append((loss.detach(), norm.detach()))
                    last = s.step == self.last_step
                    log = s.step % t.log_every == 0 or last or bool(stop[0] or stop[1])  # a row for the last step
                    if log or any(self.due(last or bool(stop[1]))):
                        self.settle()
                    self.window_time += time.perf_counter() - tick
                    self.progress(lr, per_step, log)
                    if stop[0]:
                        status = "terminated" if signals.received == signal.SIGTERM else "interrupted"
                        break
                    if stop[1]:
                        status = "time_limit"
                        self.periodic(last=True)  # the final held-out number and sample grid, as at max_steps
                        break
                    self.periodic(last)
                if self.saved_step != s.step:
                    self.settle()
                    self.save()
        finally:
            self.bar.close()
            if ctx.is_main:
                self.run_dir.close()
                self.logger.close()
        summary = {
            "status": status, "step": s.step, "run_dir": str(self.run_dir.path),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "train_bpd": self.train_bpd, "eval_bpd": self.last_eval, "eval_step": self.last_eval_step,
            "minutes": (time.monotonic() - self.start) / 60,
        }
        if ctx.is_main:
            report(summary, self.t.max_minutes)
        return summary

    def settle(self) -> None:
        """Read the steps not read yet (self.window) into self.read, for the metrics row; stop the
        run at the first that is not finite (check_finite)."""
        self.read += self.check_finite(self.window, self.state.step - len(self.window) + 1)
        self.window = []

    def check_finite(self, steps: list[tuple[torch.Tensor, torch.Tensor]], first: int) -> list[list[float]]:
        """(loss, grad norm) of steps first, first + 1, ... on the device -> as floats, read in one
        transfer; raises RunError at the first that is not finite."""
        values = torch.stack([torch.stack([loss.float(), norm.float()]) for loss, norm in steps]).tolist() if steps else []
        for i, (loss, norm) in enumerate(values):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                self.stop_on_nonfinite(loss, norm, first + i)
        return values

    @property
    def last_step(self) -> int:
        """Where the loop ends unless the time limit or a signal ends it first: train.max_steps,
        or the end of a cooldown that the time limit planned (a plan in steps ends there too)."""
        return min(self.t.max_steps, self.state.cooldown.end or self.t.max_steps)

    def plan_cooldown(self) -> None:
        """Fix the cooldown's steps now that (1 - train.cooldown) of train.max_minutes is spent:
        the step just taken (the loop counts it next) begins it; the rate so far sets its end."""
        done = self.state.step + 1
        self.state.cooldown.plan_by_time(done, done - self.first_step)
        self.bar.total = self.last_step
        if self.ctx.is_main:
            self.note(
                f"train.cooldown: {self.t.cooldown:.0%} of train.max_minutes left; the learning rate "
                f"falls linearly to 0 from step {done} to step {self.state.cooldown.end} (the steps the rate "
                "so far gives in that time), where the run ends"
            )

    def progress(self, lr: float, per_step: int, log: bool) -> None:
        """Advance the progress bar; on log steps (settled: see train), write a metrics row for
        the steps since the last one (and a line when stderr is not a terminal) and show its
        numbers on the bar."""
        if self.ctx.is_main:
            self.bar.update(1)
        if not log:
            return
        loss, norm = self.read[-1]
        speed = per_step * len(self.read) / max(self.window_time, 1e-9)
        self.train_bpd = sum(value for value, _ in self.read) / len(self.read)
        if self.ctx.is_main:
            self.bar.set_postfix_str(f"bpd {loss:.3f} lr {lr:.2e} img/s {speed:.0f}", refresh=False)
            self.run_dir.log({
                "step": self.state.step, "loss": loss, "train_bpd": self.train_bpd, "lr": lr, "grad_norm": norm,
                "images_per_sec": speed, "epoch": self.state.epoch, "elapsed_s": round(time.monotonic() - self.start, 3),
            })
            self.logger.scalars(self.state.step, {
                "train/loss": loss, "train/bpd": self.train_bpd, "train/lr": lr, "train/grad_norm": norm,
                "train/images_per_sec": speed,
            })
            if self.bar.disable:
                print(
                    f"step {self.state.step}/{self.last_step}  loss {loss:.4f} bits/dim  lr {lr:.3g}  "
                    f"grad norm {norm:.3g}  {speed:.0f} img/s",
                    file=sys.stderr, flush=True,
                )
        self.read, self.window_time = [], 0.0

    def due(self, last: bool) -> tuple[bool, bool, bool]:
        """(held-out evaluation, sample grid, checkpoint): which periodic() writes at this step."""
        t, step = self.t, self.state.step
        return (
            bool(t.eval_every and self.eval_set is not None and (step % t.eval_every == 0 or last)),
            bool(t.sample_every and t.sample_count and (step % t.sample_every == 0 or last)),
            bool(t.checkpoint_every and step % t.checkpoint_every == 0 and not last),  # the last: after the loop
        )

    def periodic(self, last: bool) -> None:
        """Held-out bits/dim, sample grids and checkpoints, each every N steps (and at the end)."""
        evaluate, sample, save = self.due(last)
        if evaluate:
            self.evaluate()
        if sample and self.ctx.is_main:
            t = self.t
            grid = self.run_dir.write_samples(self.inference_model, self.state.step, t.seed, t.sample_count, self.eval_set, self.device)
            self.logger.image("samples", self.state.step, grid)
        if save:
            self.save()

    def _stream(self):
        ds = self.train_set
        index_lists = RankBatches(self.order, self.state.epoch, self.state.index, self.t.batch_size, self.t.grad_accum, self.ctx)
        return batches(ds, iter(index_lists), self.config.data.num_workers, seed=self.t.seed + self.ctx.rank)

    def stop_on_nonfinite(self, loss: float, norm: float, step: int):
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
        kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
        raise RunError(
            f"{what} at step {step}: training stopped, nothing saved since; {kept}. "
            "Try a lower train.lr, more train.warmup_steps or train.grad_clip"
        )
