"""Checkpoint files: atomic save, validated load, the newest of a run (the weights in one, and
`load_model`: imagetx.storage.weights).

A checkpoint is a dict of tensors and plain values, readable with `torch.load(weights_only=True)`:

    format, format_version, imagetx_version, step,
    model       state dict of the bare model (never DDP's `module.` or torch.compile's `_orig_mod.`),
    ema         state dict of the moving average of its weights (train.ema > 0), else absent or None;
                what eval-bpd, sample, superres and export use by default (`weights`),
    optimizer, scheduler   their state dicts (None when saved without them),
    data_position          {"epoch", "index", "dataset_size"}: where the next batch starts,
    config                 RunConfig.to_dict(),
    rng                    one entry per process: {"torch", "cuda", "python"} generator states,
    world_size.

Files live at RUN/checkpoints/step-00001000.pt and are written to a temporary file in the same
directory, then renamed with os.replace: a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from imagetx.errors import CheckpointError
from imagetx.storage.export_format import incomplete_export, is_export, read_export
from imagetx.storage.pretrained import find_pretrained, pretrained_names
from imagetx.system.atomic import atomic_write

FORMAT = "imagetx-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})\.pt$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the run with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ---- building and saving ---------------------------------------------------------------------------
def unwrap_model(module: nn.Module) -> nn.Module:
    """The bare model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def model_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the bare model, with any wrapper prefixes removed from the keys."""
    state = unwrap_model(module).state_dict()
    return {strip_prefixes(k): v for k, v in state.items()}


def strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def rng_state() -> dict:
    """This process's generator states: torch CPU, every CUDA device, Python's `random`."""
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
    }


def set_rng_state(state: Mapping) -> None:
    """Restore what rng_state() returned (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


def make_checkpoint(
    *,
    model: nn.Module,
    config: Mapping,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    cooldown: Mapping | None = None,
    data_position: Mapping | None = None,
    rng: list | None = None,
    ema: nn.Module | None = None,
) -> dict:
    """Assemble a checkpoint dict. config: RunConfig.to_dict(); rng: one rng_state() per process
    (default: this process's)."""
    from imagetx import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "imagetx_version": __version__,
        "step": int(step),
        "model": model_state_dict(model),
        "ema": model_state_dict(ema) if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "cooldown": dict(cooldown) if cooldown is not None else None,
        "data_position": dict(data_position) if data_position is not None else None,
        "config": dict(config),
        "rng": rng if rng is not None else [rng_state()],
        "world_size": len(rng) if rng is not None else 1,
    }


def save_checkpoint(run_dir: str | os.PathLike, checkpoint: Mapping, keep: int = 0) -> Path:
    """Write RUN/checkpoints/step-NNNNNNNN.pt atomically; then delete all but the newest `keep`
    checkpoints (0: keep all). The file just written is never deleted."""
    path = checkpoint_path(run_dir, checkpoint["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(dict(checkpoint), f))
    if keep > 0:
        older = [p for _, p in list_checkpoints(run_dir) if p != path]
        for p in older[: max(len(older) - (keep - 1), 0)]:
            p.unlink(missing_ok=True)
    return path


# ---- loading -------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, an export folder (itself), a run directory (-> its newest checkpoint),
    or the name of a pretrained model when no such path exists (-> its export folder, in the
    package). Raises CheckpointError."""
    path = Path(path)
    if not path.exists() and find_pretrained(path) is not None:
        return find_pretrained(path)
    if is_export(path):
        return path
    if path.is_dir():
        missing = incomplete_export(path)  # not a run directory: no "no checkpoints in DIR/checkpoints"
        if missing:
            raise CheckpointError(missing)
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: no checkpoints in {path / 'checkpoints'}")
        return latest
    if not path.exists():
        if len(path.parts) == 1 and not path.suffix:  # it reads as a name
            raise CheckpointError(f"{path}: no such checkpoint, run directory or pretrained model (pretrained: "
                                  f"{', '.join(pretrained_names()) or 'none installed'}; `imagetx models` lists them)")
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """Read and check a checkpoint (a file, an `imagetx export` folder, or a run directory: its newest).

    Raises CheckpointError (one line naming the file) when it is missing, truncated, not an
    imagetx checkpoint, or from a newer format."""
    path = resolve_checkpoint(path)
    if is_export(path):  # safetensors and JSON: nothing to unpickle
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **read_export(path, map_location)}
    ckpt = read_torch_file(path, "checkpoint", map_location=map_location, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an imagetx checkpoint (no '{FORMAT}' marker)")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version!r} is newer than this imagetx reads "
            f"({FORMAT_VERSION}); upgrade imagetx"
        )
    missing = [k for k in ("step", "model", "config") if k not in ckpt]
    config = ckpt.get("config")
    if not missing and not (isinstance(config, dict) and isinstance(config.get("model"), dict)):
        missing.append("config.model")
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    wrong = _field_problems(ckpt)
    if wrong:
        raise CheckpointError(f"{path}: not a valid checkpoint: {'; '.join(wrong[:3])}")
    return ckpt


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _field_problems(ckpt: Mapping) -> list[str]:
    """Every field of a checkpoint whose type is not what make_checkpoint writes, one line each:
    what training, evaluation and export read, checked once so that a tampered field is a
    CheckpointError and never an exception deep inside a command."""
    problems = []

    def wrong(name: str, value, expected: str) -> None:
        problems.append(f"its {name} is {str(value)[:40]!r}, not {expected}")

    if not _is_count(ckpt["step"]):
        wrong("step", ckpt["step"], "a whole number >= 0")
    for key in ("model", "config"):
        if not isinstance(ckpt[key], Mapping):
            wrong(key, ckpt[key], "a dict")
    for key in ("ema", "optimizer", "scheduler", "cooldown", "data_position"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], Mapping):
            wrong(key, ckpt[key], "a dict")
    position = ckpt.get("data_position")
    if isinstance(position, Mapping):
        for key in ("epoch", "index"):
            if key in position and not _is_count(position[key]):
                wrong(f"data_position.{key}", position[key], "a whole number >= 0")
    cooldown = ckpt.get("cooldown")
    if isinstance(cooldown, Mapping) and cooldown.get("by_time"):
        for key in ("start", "end"):
            if not _is_count(cooldown.get(key)):
                wrong(f"cooldown.{key}", cooldown.get(key), "a whole number >= 0")
    if "world_size" in ckpt and not (_is_count(ckpt["world_size"]) and ckpt["world_size"] >= 1):
        wrong("world_size", ckpt["world_size"], "a whole number >= 1")
    rng = ckpt.get("rng")
    if rng is not None:
        ok = isinstance(rng, list) and all(
            isinstance(r, Mapping) and isinstance(r.get("torch"), torch.Tensor)
            and all(isinstance(c, torch.Tensor) for c in (r.get("cuda") or []))
            and isinstance(r.get("python"), Mapping) and isinstance(r["python"].get("state"), torch.Tensor)
            and _is_count(r["python"].get("version")) and isinstance(r["python"].get("gauss"), (float, type(None)))
            for r in rng
        )
        if not ok:
            problems.append("its rng is not one generator state per process")
    return problems


_TORCH_ZIP = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6: a zip archive
_TORCH_LEGACY = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)  # the older one begins with this
_PICKLE = b"\x80"  # any other pickle (protocol 2 and later)


def read_torch_file(path: str | os.PathLike, what: str = "checkpoint", map_location="cpu", mmap: bool = False):
    """The one reader of a file torch.save wrote (checkpoints, --inception-weights): unpickled
    with weights_only=True, so that only tensors and plain values are ever built. The file is
    classified before and around torch.load, and each kind of unusable file is one line that
    says what the file is, never torch's own text (which suggests weights_only=False: the one
    change that would let a crafted file run code):

        empty, or a torch.save file that ends early or is damaged -> "not a readable {what}"
        a file that carries Python objects or code                -> "not {what}: ... never executes"
        anything else (an image, text, random bytes)              -> "not a {what} at all"

    Raises CheckpointError naming `path`."""
    path = Path(path)
    article = "an imagetx checkpoint" if what == "checkpoint" else f"a {what}"
    try:
        with open(path, "rb") as f:
            head = f.read(len(_TORCH_LEGACY))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if not head:
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt: the file is empty)")
    objects = (f"{path}: not {article}: it carries Python objects or code, not only tensors and plain values; "
               "imagetx never executes those, so it does not read the file")
    zipped, legacy = head.startswith(_TORCH_ZIP), head == _TORCH_LEGACY
    if not (zipped or legacy):
        if head.startswith(_PICKLE):  # a pickle, but not one torch.save wrote
            raise CheckpointError(objects)
        raise CheckpointError(f"{path}: not {article} at all (not a file that torch.save writes)")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's business
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError:  # a global or an instruction that weights_only refuses to run
        raise CheckpointError(objects) from None
    except Exception as exc:  # damage shows as RuntimeError, EOFError, KeyError, ... from the reader
        reason = "its zip archive cannot be read" if zipped else "it ends early or is damaged"
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt: {reason}, {type(exc).__name__})") from None


def check_resumable(ckpt: Mapping, path: str | os.PathLike = "checkpoint") -> None:
    """A checkpoint training can continue from holds optimizer and scheduler state and its step.
    Raises CheckpointError saying what is missing and what the file is still good for."""
    missing = [k for k in ("optimizer", "scheduler") if not isinstance(ckpt.get(k), Mapping)]
    if missing:
        raise CheckpointError(
            f"{path}: holds no {' or '.join(missing)} state, so training cannot continue from it "
            "(it still serves eval-bpd and sample)"
        )
