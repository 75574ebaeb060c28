"""The models a server was started with: each loaded once, under a short name that requests use
(requests never name a path), with its decoding copy in the chosen precision."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from imagetx.model.decoding import for_decoding
from imagetx.storage.checkpoint import resolve_checkpoint
from imagetx.storage.export_format import model_kind
from imagetx.storage.pretrained import find_pretrained
from imagetx.storage.weights import load_model
from imagetx.system.precision import Precision

# images one request may ask for: the decoding copy is packed for this many rows
MAX_COUNT = 16


@dataclass
class ServedModel:
    """One model: `model` in fp32 (likelihood, the bits maps), `decoder` in the served precision
    (sampling; `model` itself in fp32)."""

    name: str
    spec: str  # what the user gave: a run directory, checkpoint, export folder or pretrained name
    path: Path
    model: torch.nn.Module
    decoder: torch.nn.Module
    precision: Precision
    info: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config


def model_name(spec: str, path: Path) -> str:
    """The short name a request gives: a pretrained model's own name, a folder's name (a run
    directory, an export), or a checkpoint file's stem."""
    if find_pretrained(spec) is not None and not Path(spec).exists():
        return spec
    given = Path(spec)
    return given.name if given.is_dir() else given.stem


def describe(name: str, spec: str, config, precision: Precision) -> dict:
    """What GET /api/models says about a model: its name, what it generates and its config."""
    cfg = config.to_dict()
    return {
        "name": name,
        "source": spec,
        "kind": model_kind(cfg),
        "image_size": list(config.image_size),
        "channels": config.channels,
        "num_classes": config.num_classes,
        "source_size": None if config.source_size is None else list(config.source_size),
        "superres": config.source_size is not None,
        "precision": precision.name,
        "config": cfg,
    }


def load_models(specs: list[str], device: torch.device, precision: Precision) -> dict[str, ServedModel]:
    """Load every model once, on `device` -> {name: ServedModel}, in the order given. Two models
    whose names would clash get -2, -3, ... Raises CheckpointError for one that cannot be loaded."""
    served: dict[str, ServedModel] = {}
    for spec in specs:
        path = resolve_checkpoint(spec)
        model = load_model(spec, device=device)
        base = name = model_name(spec, path)
        k = 2
        while name in served:
            name, k = f"{base}-{k}", k + 1
        decoder = for_decoding(model, precision.dtype, MAX_COUNT)
        served[name] = ServedModel(name, spec, path, model, decoder, precision,
                                   describe(name, spec, model.config, precision))
    return served
