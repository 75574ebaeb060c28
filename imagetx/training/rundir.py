"""The run directory of `imagetx train`, and resuming a run from one of its checkpoints.

    RUN/config.toml                 the resolved configuration
    RUN/metrics.jsonl               one JSON object per line (training and held-out rows)
    RUN/checkpoints/step-NNNNNNNN.pt
    RUN/samples/step-NNNNNNNN.png   sample grids from a fixed seed (comparable across steps)
    RUN/curves.png                  learning curves, redrawn at each evaluation (imagetx.plot)
    RUN/tensorboard/, RUN/wandb/    with train.logger (imagetx.training.loggers)

`resume_from` is the one place a resumed run is resolved: it finds the checkpoint (`--resume
auto` or a path), loads it once and returns the config to use: the keys the user gave (a config
file, flags, `--set`) over the checkpoint's config, so the architecture comes from the checkpoint.
`RunDir` checks the directory before a run and writes its files (only the main process does).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from imagetx import console
from imagetx.system.atomic import atomic_write, remove_left_by_dead_processes
from imagetx.storage.checkpoint import (
    check_resumable,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from imagetx.config import RunConfig, resolve_config, save_config, stored_config
from imagetx.data.batches import batches
from imagetx.errors import CheckpointError, ConfigError, RunError
from imagetx.model.config import ModelConfig
from imagetx.storage.images import display_scale, save_grid
from imagetx.system.lock import RunLock


def resume_from(config: RunConfig, resume: str | os.PathLike | None) -> tuple[RunConfig, Path | None, dict | None]:
    """The checkpoint a run continues from and the config to continue with -> (config, path,
    checkpoint); (config, None, None) for a new run or `resume="auto"` in a directory without
    checkpoints.

    resume: None, "auto" (the newest checkpoint in config.train.out) or a checkpoint path (a run
    directory: its newest). The config is the checkpoint's, with the keys `config.explicit` names
    over it (every key for a config built in Python); "auto" keeps config.train.out. A given model
    key that differs from the checkpoint's raises ConfigError: the architecture comes from the
    checkpoint. Raises CheckpointError for an unreadable checkpoint or one with unknown keys."""
    if resume is None:
        return config, None, None
    auto = str(resume) == "auto"
    if auto:
        path, ckpt = _newest_resumable(config.train.out)
        if path is None:
            return config, None, None
    else:
        path = resolve_checkpoint(resume)
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, path)
    saved = {section: dict(values) for section, values in stored_config(ckpt, path).items()}
    try:  # the model keys an older checkpoint lacks take today's defaults, as when loading its weights
        saved["model"] = ModelConfig.from_dict(saved["model"]).to_dict()
        resolve_config([], base=saved)  # the checkpoint's own values: a bad one is the file's fault (exit 1), not the user's
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: its config is not valid for this imagetx: {exc}") from None
    mine = config.to_dict()
    given = {f"{s}.{k}" for s, values in mine.items() for k in values} if config.explicit is None else config.explicit
    given = given | {"train.out"} if auto else given
    layer: dict[str, dict] = {}
    for key in sorted(given):
        section, name = key.split(".")
        layer.setdefault(section, {})[name] = mine[section][name]
    resumed = resolve_config([("your settings", layer)], base=saved)
    model = resumed.model.to_dict()
    diffs = [f"model.{k} = {model[k]!r} (checkpoint: {saved['model'][k]!r})" for k in model if model[k] != saved["model"][k]]
    if diffs:
        raise ConfigError([f"the architecture comes from the checkpoint {path}; the config differs: {d}" for d in diffs])
    return resumed, path, ckpt


def _newest_resumable(out) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of a run that loads and can be resumed, and its contents; a newer one
    that cannot is named in a warning, with the command that resumes from the one chosen."""
    skipped = []
    for _, path in reversed(list_checkpoints(out)):
        try:
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, path)
        except CheckpointError as exc:
            console.warn(str(exc))
            skipped.append(path)
            continue
        if skipped:
            console.warn(
                f"resuming from {path.name}, the newest checkpoint that can be resumed, not {skipped[0].name} "
                f"(the same as: imagetx train --out {out} --resume {path})"
            )
        return path, ckpt
    if skipped:
        raise CheckpointError(f"none of the {len(skipped)} checkpoints in {Path(out) / 'checkpoints'} can be resumed")
    return None, None


class RunDir:
    """The files of one run. Only the main process calls the methods that write."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metrics = None
        self.lock = RunLock(self.path)  # held by the main process from prepare() to unlock()
        self._committed_grids: set[Path] = set()
        self._metrics_size: int | None = None
        self._had: dict[str, bool] = {}  # whether each of _REPLACED existed at the last commit

    def prepare(self, resume: str | os.PathLike | None, checkpoint: Path | None, step: int | None) -> None:
        """Check that the run may write here (a new or empty directory, or the run `checkpoint`
        at `step` belongs to) and that the directory is writable; create it. Raises RunError."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {out} is a file; name the run's directory (a new one, or an earlier run's)")
        nonempty = out.exists() and any(p.name != self.lock.path.name for p in out.iterdir())
        if resume is None and nonempty:
            raise RunError(
                f"{out} is not empty (it holds an earlier run); pass --resume auto to continue it, "
                "or choose another --out"
            )
        if checkpoint is not None and str(resume) != "auto":
            newer = [p for s, p in list_checkpoints(out) if p.resolve() != checkpoint.resolve() and s > step]
            if newer:
                raise RunError(
                    f"{out} has checkpoints newer than {checkpoint} (up to {newer[-1].name}); resume from "
                    "the newest with --resume auto, or choose another --out"
                )
            if checkpoint.resolve().parent.parent != out.resolve() and nonempty:
                raise RunError(
                    f"{out} is not empty and {checkpoint} belongs to another run; continue a run from one of "
                    "its own checkpoints, or start from this one in a new --out"
                )
        try:  # leaves at most an empty directory behind if the run fails before it starts
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunError(f"cannot write to the output directory {out}: {exc.strerror or exc}") from None
        self.lock.acquire()  # one trainer per run directory: a second one stops here with one line

    def unlock(self) -> None:
        self.lock.release()

    # ---- nothing lost on a full disk -------------------------------------------------------------
    # The directory always describes a checkpoint: the one the run started from, or the newest it
    # wrote. A write that fails (a full disk, a directory gone read-only) takes back everything the
    # run wrote after that checkpoint, with renames, truncation and deletion, which need no free
    # space; a resume first removes what a killed run left of steps after the checkpoint it
    # continues from. (TensorBoard and W&B files are the loggers' own and are left as they are.)
    _REPLACED = ("config.toml", "curves.png")  # rewritten whole: a hard link keeps the committed copy

    def start(self, config: RunConfig, resumed_step: int | None) -> None:
        """Begin writing: reconcile a resumed run with its checkpoint (`resumed_step`), take the
        directory as it is now as the state to return to, write config.toml, open metrics.jsonl."""
        remove_left_by_dead_processes(self.path, ".*.committed-*")  # a killed run's backups
        if resumed_step is not None:
            for step, grid in self._grids().items():
                if step > resumed_step:  # drawn by a run that stopped before its next checkpoint
                    grid.unlink(missing_ok=True)
        metrics = self.path / "metrics.jsonl"
        self._commit(metrics.stat().st_size if metrics.is_file() else None)
        with self._writing("config.toml"):
            save_config(config, self.path / "config.toml")
        with self._writing("metrics.jsonl"):
            self._open_metrics(resumed_step)

    def _backup(self, name: str) -> Path:
        return self.path / f".{name}.committed-{os.getpid()}"

    def _grids(self) -> dict[int, Path]:
        grids = {}
        for p in (self.path / "samples").glob("step-*.png"):
            if p.stem[5:].isdigit():
                grids[int(p.stem[5:])] = p
        return grids

    def _commit(self, metrics_size: int | None) -> None:
        """The files as they are now become the state a failed write returns to."""
        self._had = {}
        for name in self._REPLACED:
            backup = self._backup(name)
            backup.unlink(missing_ok=True)
            self._had[name] = (self.path / name).is_file()
            if self._had[name]:
                try:
                    os.link(self.path / name, backup)
                except OSError:  # a file system without hard links: a failure leaves the newer copy
                    pass
        self._committed_grids = set(self._grids().values())
        self._metrics_size = metrics_size  # None: metrics.jsonl did not exist

    def _discard_backups(self) -> None:
        for name in self._REPLACED:
            self._backup(name).unlink(missing_ok=True)

    def roll_back(self) -> None:
        """Return to the committed state: the files as at the run's start or its newest checkpoint."""
        if self.metrics is not None:
            try:
                self.metrics.close()
            except OSError:  # the buffered rest of a row: it is cut off below
                pass
            self.metrics = None
        steps = [
            lambda: [p.unlink(missing_ok=True) for p in self._grids().values() if p not in self._committed_grids],
            lambda: os.truncate(self.path / "metrics.jsonl", self._metrics_size) if self._metrics_size is not None
            else (self.path / "metrics.jsonl").unlink(missing_ok=True),
        ]
        for name in self._REPLACED:
            steps.append(lambda n=name: self._restore(n))
        for step in steps:
            try:
                step()
            except OSError:  # the directory itself is gone or read-only: nothing more can be done
                pass

    def _restore(self, name: str) -> None:
        backup, path = self._backup(name), self.path / name
        if not backup.exists():
            if not self._had.get(name, True):  # the run made it
                path.unlink(missing_ok=True)
        elif path.exists() and os.path.samefile(backup, path):  # never replaced (rename would keep both names)
            backup.unlink()
        else:
            os.replace(backup, path)

    @contextmanager
    def _writing(self, what: str):
        try:
            yield
        except OSError as exc:
            self.roll_back()
            raise RunError(f"cannot write {what} in {self.path}: {exc.strerror or exc}; the run directory is "
                           "left as at its newest checkpoint") from None

    def _open_metrics(self, resumed_step: int | None) -> None:
        """Start metrics.jsonl, keeping a resumed run's rows up to its checkpoint: rows written
        after it (before a crash) are written again by this run. They are the file's end, which
        is cut off in place; an older file with rows out of order is rewritten."""
        path = self.path / "metrics.jsonl"
        if resumed_step is not None and path.exists():
            lines = path.read_bytes().splitlines(keepends=True)
            kept, prefix, in_prefix = [], 0, True
            for line in lines:
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    row = None  # a row cut off by a crash
                step = row.get("step", 0) if isinstance(row, dict) else None
                if line.endswith(b"\n") and isinstance(step, int) and step <= resumed_step:
                    kept.append(line)
                    prefix += len(line) if in_prefix else 0
                else:
                    in_prefix = False
            if sum(map(len, kept)) == prefix:
                if prefix != path.stat().st_size:
                    os.truncate(path, prefix)
            else:
                atomic_write(path, b"".join(kept))
            self._metrics_size = path.stat().st_size
        self.metrics = open(path, "a", buffering=1)

    def log(self, row: dict) -> None:
        with self._writing("metrics.jsonl"):
            self.metrics.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self._discard_backups()

    def save_checkpoint(self, ckpt: dict, keep: int) -> Path:
        with self._writing("a checkpoint"):
            path = save_checkpoint(self.path, ckpt, keep=keep)
        self._commit(self.path.joinpath("metrics.jsonl").stat().st_size if self.metrics is not None else None)
        return path

    def write_samples(self, model, step: int, seed: int, count: int, eval_set, device: torch.device) -> Path:
        """samples/step-NNNNNNNN.png: `count` samples of `model` drawn with `seed`, the same noise
        at every step, so grids are comparable across steps (rows of source, sample and target for
        super-resolution, whose sources are the first images of eval_set). Uses no generator, so
        the global ones stay as they were."""
        cfg, n = model.config, count
        labels = source = targets = None
        if cfg.num_classes:
            labels = torch.arange(n, device=device) % cfg.num_classes
        if cfg.source_size is not None:
            targets, source, _ = next(batches(eval_set, iter([list(range(min(n, len(eval_set))))])))
            n = targets.shape[0]
            source = source.to(device)
        was_training = model.training
        model.eval()
        try:  # the noise is a function of the seed (model/noise.py): no generator is read or advanced
            images = model.sample(n, labels=labels, source=source, seed=seed).cpu()
        finally:
            model.train(was_training)
        nrow = None
        if targets is not None:  # rows of (source enlarged, sample, ground truth)
            H, W = cfg.image_size
            up = torch.nn.functional.interpolate(source.cpu().permute(0, 3, 1, 2).float(), size=(H, W), mode="nearest")
            up = up.to(torch.uint8).permute(0, 2, 3, 1)  # (n, H, W, C)
            images = torch.stack([up, images, targets.cpu().to(torch.uint8)], dim=1).flatten(0, 1)  # (3n, H, W, C)
            nrow = 3 * max(1, int(math.sqrt(n / 3)))
        path = self.path / "samples" / f"step-{step:08d}.png"
        with self._writing(f"samples/{path.name}"):
            path.parent.mkdir(exist_ok=True)
            save_grid(images, path, nrow=nrow, scale=display_scale(cfg.image_size))
        return path
