"""Every file in configs/ at its real geometry: image, block and flange sizes, output, classes and
source size as shipped, with a tiny width and depth (one layer of width 8).

A config added to configs/ is covered here without editing this file. Per config:
- the attention masks: no real position sees a later one, and the fast path's windows equal the
  dense definition key for key;
- the full dependency graph of one image: every sub-pixel changed, each output compared;
- the cached decoder equals the full forward pass at every one of its steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from imagetx import ImageTransformer
from imagetx.config import load_config
from support.properties import (
    check_cache_equals_full_pass, check_dependencies, check_masks, hidden_states_as_outputs, model_inputs,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
# the geometries whose whole dependency graph takes longest (64x64 RGB, and a 2D super-resolution):
# the full suite runs them, the fast tier (-m "not slow") leaves them out
SLOW = {"imagenet64_1d", "imagenet64_2d", "celeba_superres_2d"}
PARAMS = [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in CONFIGS]


def tiny_at_real_geometry(path: Path):
    model = load_config(path).model
    return dataclasses.replace(
        model, n_layers=1, d_model=8, n_heads=1, attention_dim=0, d_ff=8, dropout=0.0, attention_dropout=0.0,
        encoder_layers=1 if model.source_size is not None else 0,
    )


def test_there_are_configs_to_check():
    assert len(CONFIGS) >= 10 and any(tiny_at_real_geometry(p).attention == "local2d" for p in CONFIGS)


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: p.stem)
def test_shipped_geometry_sees_no_future(path):
    config = tiny_at_real_geometry(path)
    torch.manual_seed(0)
    model = ImageTransformer(config).eval()
    check_masks(model)
    # one change per sub-pixel (H*W*C images); the outputs compared are the final hidden states,
    # which the head maps position by position (the logits would cost most of the time here)
    with hidden_states_as_outputs(model):
        check_dependencies(model, *model_inputs(config, batch=1), shifts=(101,), chunk=64)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_geometry_cache_equals_full_pass(path):
    config = tiny_at_real_geometry(path)
    torch.manual_seed(1)
    model = ImageTransformer(config).eval()
    check_cache_equals_full_pass(model, *model_inputs(config, batch=1, seed=2))
