"""The CUDA code path, run on this CPU: every tensor must sit on the model's device.

No GPU is needed. Inside `fake_cuda()` (torch's FakeTensorMode) the model's parameters and
buffers and the inputs are fake tensors on "cuda:0": every operation runs its real dispatch and
checks devices exactly as on a GPU, but computes no data, so a tensor built on the CPU that
meets a CUDA one raises "Expected all tensors to be on the same device", and a value read back
to Python (a host sync on a GPU) raises DataDependentOutputException. `torch.autocast("cuda")`
switches itself off where CUDA is absent; `cuda_autocast()` builds it as on a machine with a GPU,
so the CUDA autocast rules run too.

Autograd's engine needs a CUDA driver for a backward pass over CUDA tensors, fake or not: the
backward and the optimizer step run on the meta device instead, which checks devices the same
way (a CPU tensor meeting a meta one raises) and reads nothing back either.

Checked for every file in configs/ (real image, block and flange sizes, tiny width: a new
config is covered without editing this file) and for Hypothesis-drawn configurations (every
pattern, both outputs, classes, super-resolution, consistent, range_input, relative logits and
rotary):
- a training forward pass in fp32 and under bf16 autocast, and an eval-mode nll;
- cached decoding through two block boundaries in fp32 and bf16 (for_decoding's copies);
- the backward pass and the optimizer step of `imagetx train` (meta);
and, on drawn configurations, the library functions behind the commands: `generate` (`sample`,
run grids, `eval-fid`'s sampling), `super_resolve` (`superres`), the evaluation loop of
`eval-bpd` and the trainer's set-up and optimizer step.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from torch._subclasses.fake_tensor import FakeTensorMode

from imagetx import ImageTransformer
from imagetx.config import load_config
from imagetx.model.decoding import IncrementalDecoder, for_decoding
from model_properties import model_inputs
from test_properties import model_configs

CUDA = torch.device("cuda", 0)
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@contextmanager
def fake_cuda():
    """Within the block, tensors moved to "cuda:0" are fake CUDA tensors (see the module doc)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def cuda_autocast(dtype: torch.dtype = torch.bfloat16):
    """torch.autocast("cuda", dtype) as built on a machine with a GPU."""
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        return torch.autocast("cuda", dtype=dtype)


def tiny(config):
    """The config at its real geometry with a tiny width and depth (two layers: a layer's output
    reaches another layer's cache)."""
    return dataclasses.replace(
        config, n_layers=2, d_model=8 * config.n_heads, attention_dim=0, d_ff=16, dropout=0.0,
        attention_dropout=0.0, encoder_layers=1 if config.source_size is not None else 0,
    )


def on(device, *tensors):
    return tuple(None if t is None else t.to(device) for t in tensors)


def check_device(t: torch.Tensor, device: torch.device, what: str) -> None:
    assert t.device == device, f"{what} is on {t.device}, not {device}"


def decode_steps(config, block: int) -> list[int]:
    """Generation steps that start, cross two block boundaries and end the image."""
    steps = {0, 1, block - 1, block, block + 1, 2 * block - 1, 2 * block, 2 * block + 1, config.seq_len - 1}
    return sorted(k for k in steps if 0 <= k < config.seq_len)


def decoding_copies(model) -> dict:
    """for_decoding's fp32 model and bf16 copy of a CPU model, as on a GPU (no CPU-only
    PackedLinear layers). Made before the move to fake CUDA: torch cannot deepcopy a fake tensor
    nor change a fake module's dtype in place; the copy and the cast do not depend on the device."""
    with mock.patch("imagetx.model.kernels.packing_applies", return_value=False):
        return {dtype: for_decoding(model, dtype, batch=2) for dtype in (torch.float32, torch.bfloat16)}


def check_decoding(model, labels, source, steps: list[int]) -> None:
    """The cached decoder's set-up and its steps at `steps`, on the model's device (the caches'
    contents do not matter here: every step checks the devices it touches)."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        decoder = IncrementalDecoder(model, 2, labels, source)
        prev = torch.zeros((2,) if cfg.output == "categorical" else (2, cfg.channels), dtype=torch.long, device=CUDA)
        ranges = torch.zeros(2, 3, dtype=torch.long, device=CUDA) if cfg.range_input else None
        for k in steps:
            out = decoder.step(k, prev, ranges)
            check_device(out, CUDA, f"the decoder's output at step {k} ({dtype})")


def check_model_on_fake_cuda(config, decode: str = "steps") -> None:
    """Training forward (fp32, bf16 autocast), eval nll and cached decoding (fp32, bf16) on
    fake CUDA. decode: "steps" (decode_steps) or "sample" (whole images through generate)."""
    model = ImageTransformer(config)  # built on the CPU, then moved: as on a GPU
    x, labels, source = model_inputs(config, batch=2)
    decoders = decoding_copies(model)
    with fake_cuda():
        model.to(CUDA)
        for decoder in decoders.values():
            if decoder is not model:  # fp32: the model itself
                decoder.to(CUDA)
        x, labels, source = on(CUDA, x, labels, source)
        model.train()
        check_device(model.nll(x, labels, source), CUDA, "the fp32 training nll")
        with cuda_autocast():
            nll = model.nll(x, labels, source)
        check_device(nll, CUDA, "the bf16 training nll")
        assert nll.dtype == torch.float32
        model.eval()
        with torch.inference_mode():
            check_device(model.nll(x, labels, source), CUDA, "the eval nll")
        for dtype, decoder in decoders.items():
            if decode == "steps":
                check_decoding(decoder, labels, source, decode_steps(config, model.layout.block))
            else:
                images = decoder.sample(2, labels, source, temperature=0.8)
                check_device(images, CUDA, f"the images sampled ({dtype})")


def check_training_step_on_meta(config) -> None:
    """The backward pass and one optimizer step of `imagetx train` (imagetx.optim) on meta."""
    from imagetx.config import RunConfig
    from imagetx.optim import make_optimizer

    meta = torch.device("meta")
    model = ImageTransformer(config).to(meta).train()
    run = RunConfig()
    run.model = config
    optimizer, scheduler, _ = make_optimizer(model, run)
    x, labels, source = on(meta, *model_inputs(config, batch=2))
    model.nll(x, labels, source).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device == meta for g in grads)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    assert all(p.device == meta for p in model.parameters())


# ---- every shipped config ---------------------------------------------------------------------
def test_there_are_configs_to_check():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_runs_on_fake_cuda(path):
    check_model_on_fake_cuda(tiny(load_config(path).model))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_trains_on_meta(path):
    check_training_step_on_meta(tiny(load_config(path).model))


# ---- drawn configurations ---------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(model_configs())
def test_drawn_config_runs_and_samples_on_fake_cuda(config):
    # whole images through generate where they are short (a fake step costs milliseconds)
    check_model_on_fake_cuda(config, decode="sample" if config.seq_len <= 64 else "steps")


@settings(max_examples=30, deadline=None)
@given(model_configs())
def test_drawn_config_trains_on_meta(config):
    check_training_step_on_meta(config)
