"""Tiny checkpoints to sample from: an image model and a super-resolution one."""

from __future__ import annotations

import numpy as np
import torch

from imagetx import ImageTransformer
from imagetx.storage.checkpoint import make_checkpoint, save_checkpoint
from support.configs import tiny


def write_generator(tmp_path, **model_kw):
    torch.manual_seed(0)
    cfg = tiny(**model_kw)
    model = ImageTransformer(cfg)
    ckpt = make_checkpoint(model=model, config={"model": cfg.to_dict()}, step=1)
    return save_checkpoint(tmp_path / "run", ckpt), model


SR = dict(attention="local1d", block_length=16, image_size=(4, 4), source_size=(2, 2), encoder_layers=1)


def write_superres(tmp_path, data=None, **kw):
    torch.manual_seed(0)
    cfg = tiny(**{**SR, **kw})
    model = ImageTransformer(cfg).eval()
    config = {"model": cfg.to_dict(), **({"data": data} if data else {})}
    return save_checkpoint(tmp_path / "run", make_checkpoint(model=model, config=config, step=1)), model


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
