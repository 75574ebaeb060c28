"""The weights in a checkpoint or export: which of them a command uses (`--weights`: the moving
average of train.ema or the trained weights), loading them into a model after checking every
tensor, and `load_model`, the library's one call from a file to a ready model."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from imagetx.errors import CheckpointError, ConfigError
from imagetx.model.config import ModelConfig
from imagetx.storage.checkpoint import strip_prefixes, load_checkpoint, resolve_checkpoint


WEIGHTS = ("auto", "ema", "trained")


def weights_problems(weights: str, name: str = "--weights") -> list[str]:
    return [] if weights in WEIGHTS else [f"{name} must be one of {', '.join(WEIGHTS)}; got {weights!r}"]


def weights_key(ckpt: Mapping, weights: str = "auto", path: str | os.PathLike = "checkpoint") -> str:
    """The checkpoint entry that `weights` names: "ema" (the moving average of train.ema),
    "trained" (the optimizer's weights: "model") or "auto" (the average when there is one). An
    export holds one of the two under "model" ("exported_weights" says which). Raises ConfigError
    for an unknown choice, CheckpointError for weights the file does not hold."""
    if weights not in WEIGHTS:
        raise ConfigError(weights_problems(weights))
    exported = ckpt.get("exported_weights")
    if exported is not None:
        if weights not in ("auto", exported):
            raise CheckpointError(f"{path}: this export holds {describe_weights(ckpt, 'model')} only; leave out --weights")
        return "model"
    has_ema = isinstance(ckpt.get("ema"), Mapping)
    if weights == "ema" and not has_ema:
        raise CheckpointError(
            f"{path}: holds no moving average of its weights (trained without train.ema); use --weights trained"
        )
    return "ema" if weights == "ema" or (weights == "auto" and has_ema) else "model"


def describe_weights(ckpt: Mapping, key: str) -> str:
    """'the moving average of the weights (train.ema 0.999)' or 'the trained weights', for the
    entry `key` of a loaded checkpoint or export."""
    if key == "ema" or ckpt.get("exported_weights") == "ema":
        decay = ((ckpt.get("config") or {}).get("train") or {}).get("ema")
        return f"the moving average of the weights (train.ema {decay})" if decay else "the moving average of the weights"
    return "the trained weights"


def model_from_checkpoint(
    ckpt: Mapping, path: str | os.PathLike = "checkpoint", device="cpu", weights: str = "auto"
) -> nn.Module:
    """Build the model a loaded checkpoint describes and load its weights (strictly): the ones
    `weights` names (weights_key; by default the moving average when the run kept one)."""
    from imagetx.model.transformer import ImageTransformer

    try:
        config = ModelConfig.from_dict(dict(ckpt["config"]["model"]))
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: its model config is not valid for this imagetx: {exc}") from None
    model = ImageTransformer(config)
    load_weights(model, ckpt, path, key=weights_key(ckpt, weights, path))
    _warn_if_trained_reading_its_targets(ckpt, model, path)
    return model.to(device)


def load_weights(model: nn.Module, ckpt: Mapping, path: str | os.PathLike = "checkpoint", key: str = "model") -> None:
    """Load a checkpoint's weights (its `key` entry: "model" or "ema") into `model` after checking
    them: every tensor present, of the right shape and kind, finite. Raises CheckpointError naming
    the tensors otherwise."""
    if not isinstance(ckpt.get(key), Mapping):
        raise CheckpointError(f"{path}: its {key} entry is not a dict of tensors")
    state = {strip_prefixes(k): v for k, v in ckpt[key].items()}
    odd = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if odd:
        raise CheckpointError(f"{path}: its {key} entry holds values that are not tensors ({', '.join(odd[:3])})")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    dtypes = [
        f"{k} {state[k].dtype} vs {v.dtype}"
        for k, v in expected.items()
        if k in state and state[k].dtype.is_floating_point != v.dtype.is_floating_point
    ]
    if missing or unexpected or shapes or dtypes:
        parts = []
        problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes), ("wrong type", dtypes))
        for label, items in problems:
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise CheckpointError(f"{path}: weights do not match its model config ({'; '.join(parts)})")
    bad = [k for k, v in state.items() if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{path}: its weights hold NaN or infinity ({', '.join(bad[:3])}{more}); it cannot be used: "
            "take an earlier checkpoint of the run"
        )
    model.load_state_dict(state)


def _warn_if_trained_reading_its_targets(ckpt: Mapping, model: nn.Module, path) -> None:
    """imagetx 0.1.0 returned the outputs of a local 2D model at the wrong positions when the
    query blocks tile the grid exactly with two or more blocks per row: some outputs had read
    the sub-pixel they predict. Weights trained that way learned to rely on it."""
    layout = model.layout
    affected = layout.kind == "local2d" and layout.generation_is_internal and not layout.grid_is_internal
    if affected and ckpt.get("imagetx_version") in (None, "0.1.0"):
        warnings.warn(
            f"{path}: this local 2D model was trained with imagetx {ckpt.get('imagetx_version') or '< 0.1.1'}, "
            "whose outputs on this block geometry read the sub-pixels they predict; its bits/dim and "
            "samples are not valid: retrain it",
            stacklevel=3,
        )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", weights: str = "auto") -> nn.Module:
    """Load an ImageTransformer from a checkpoint file, an `imagetx export` folder, or a run
    directory (its newest checkpoint),
    with the checkpoint's config, on `device`, in eval mode, ready for `nll` and `sample`.

    Raises CheckpointError for a missing, truncated, foreign or incompatible file."""
    path = resolve_checkpoint(path)
    ckpt = load_checkpoint(path, map_location=device)
    return model_from_checkpoint(ckpt, path, device, weights).eval()
