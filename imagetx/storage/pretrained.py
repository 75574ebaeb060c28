"""The pretrained models installed with the package, one `imagetx export` folder each under
imagetx/pretrained/NAME/ (model.safetensors, config.json, the README.md model card, samples.png).

Their config.json also holds "provenance", written when the model was published
(scripts/publish_pretrained.py): the training command, commit, steps, hours and CPU, and exact
held-out bits/dim on the whole test split and on its first 1000 images. The weights' sha256 is
recorded in every export and checked whenever one is loaded (storage.export_format.read_export).

A name works wherever a checkpoint path does: storage.checkpoint.resolve_checkpoint looks a name
up here when no file or folder of that name exists, so a local run directory called `shapes`
still wins over the pretrained `shapes`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from imagetx.storage.export_format import CONFIG, is_export, model_kind

ROOT = Path(__file__).resolve().parents[1] / "pretrained"


def pretrained_names() -> list[str]:
    """The installed pretrained models, sorted."""
    if not ROOT.is_dir():
        return []
    return sorted(p.name for p in ROOT.iterdir() if is_export(p))


def find_pretrained(name: str | os.PathLike) -> Path | None:
    """The folder of the pretrained model called exactly `name`; None for anything else (a path
    with a separator, '..', or a name that is not installed)."""
    name = os.fspath(name)
    return ROOT / name if name in pretrained_names() else None


def catalog() -> list[dict]:
    """One dict per pretrained model, for `imagetx models`: name, what it is, its data set,
    parameters, and from its provenance the held-out bits/dim, steps, hours, CPU and commit."""
    rows = []
    for name in pretrained_names():
        meta = json.loads((ROOT / name / CONFIG).read_text())
        model, prov = meta["model"], meta.get("provenance") or {}
        held = prov.get("test") or {}
        rows.append({
            "name": name, "path": str(ROOT / name), "kind": model_kind(model),
            "image_size": model["image_size"], "channels": model["channels"],
            "dataset": (meta.get("data") or {}).get("name"), "parameters": meta.get("parameters"),
            "bpd": held.get("bpd"), "split": held.get("split"), "images": held.get("images"),
            "steps": meta.get("step"), "hours": prov.get("hours"), "cpu": prov.get("cpu"),
            "commit": prov.get("commit"), "command": prov.get("command"),
            "weights_sha256": meta.get("weights_sha256"),
        })
    return rows
