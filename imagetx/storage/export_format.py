"""The folder `imagetx export` writes (imagetx/export.py), as storage sees it: its file names,
how to recognise one, and `read_export`, which turns it into the entries of a checkpoint dict so
that load_checkpoint, and with it load_model, sample, eval-bpd and superres, take it like a
checkpoint. Only JSON and safetensors are read: nothing is unpickled.

Kept apart from the command so that storage.checkpoint reads exports without importing the
command that writes them (the two used to import each other).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from imagetx.errors import CheckpointError
from imagetx.system.paths import file_sha256

EXPORT_FORMAT = "imagetx-export"
EXPORT_VERSION = 1
WEIGHTS, CONFIG, CARD, GRID = "model.safetensors", "config.json", "README.md", "samples.png"


def model_kind(model: dict) -> str:
    """What a model config (ModelConfig.to_dict()) generates, in words."""
    if model.get("source_size"):
        h, w = model["source_size"]
        return f"super-resolution from {h}x{w}"
    if model.get("num_classes"):
        return f"class-conditional on {model['num_classes']} classes"
    return "unconditional"


def is_export(path: str | os.PathLike) -> bool:
    """A folder `imagetx export` wrote (it holds config.json and model.safetensors)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def incomplete_export(path: str | os.PathLike) -> str | None:
    """What is missing from a folder that holds part of an export (config.json or
    model.safetensors, and no checkpoints/ of a run), as one line; None for anything else."""
    path = Path(path)
    if not path.is_dir() or (path / "checkpoints").exists():
        return None
    present = [name for name in (WEIGHTS, CONFIG) if (path / name).is_file()]
    if not present or len(present) == 2:
        return None
    missing = WEIGHTS if present == [CONFIG] else CONFIG
    return (f"{path}: an incomplete `imagetx export` folder: {missing} is missing (an export holds "
            f"{WEIGHTS} and {CONFIG}); export the run again")


def read_export(path: str | os.PathLike, map_location="cpu") -> dict:
    """An export folder -> the entries of a checkpoint dict (load_checkpoint adds the format
    markers; no optimizer or scheduler: it samples and evaluates, it does not resume). Only JSON and safetensors are read.
    Raises CheckpointError naming the file and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / CONFIG}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path / CONFIG}: not an imagetx export (no '{EXPORT_FORMAT}' marker)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > EXPORT_VERSION:
        raise CheckpointError(f"{path}: export format {version!r} is newer than this imagetx reads ({EXPORT_VERSION}); upgrade imagetx")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path / CONFIG}: incomplete, it has no model config")
    step = meta.get("step") or 0
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path / CONFIG}: its step is {str(step)[:40]!r}, not a whole number >= 0")
    recorded = meta.get("weights_sha256")
    if recorded is not None and (path / WEIGHTS).is_file() and file_sha256(path / WEIGHTS) != recorded:
        raise CheckpointError(f"{path / WEIGHTS}: its sha256 is not the one {CONFIG} records (the file was "
                              "changed or damaged after export); export the run again or reinstall imagetx")
    try:  # read on the CPU, then moved: any device torch names works, as with torch.load
        weights = {k: v.to(map_location) for k, v in load_file(path / WEIGHTS).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"{path / WEIGHTS}: not a readable safetensors file (truncated or corrupt: {detail})") from None
    config = {"model": meta["model"]}
    if isinstance(meta.get("data"), dict):
        config["data"] = meta["data"]
    if isinstance(meta.get("training"), dict) and "ema" in meta["training"]:
        config["train"] = {"ema": meta["training"]["ema"]}
    return {
        "imagetx_version": meta.get("imagetx_version"),
        "step": step, "model": weights, "optimizer": None, "scheduler": None,
        "exported_weights": "ema" if meta.get("weights") == "ema" else "trained",
        "config": config,
    }
