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
- cached decoding through two block boundaries in fp32 and bf16 (for_decoding's copies), one
  position at a time, in parallel decoding's passes and through the static-shape step that
  CUDA graphs capture (model/static.py), its draw included;
- the backward pass and the optimizer step of `imagetx train` (meta);
and, on drawn configurations, the library functions behind the commands: `generate` (`sample`,
run grids, `eval-fid`'s sampling), `super_resolve` (`superres`), the evaluation loop of
`eval-bpd` and the trainer's set-up and optimizer step.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

from support.configs import TINY_MODEL
from imagetx import ImageTransformer, ModelConfig
from imagetx.config import load_config
from imagetx.model import attention
from imagetx.model.decoding import IncrementalDecoder, for_decoding
from imagetx.model.static import StaticDecoder, static_problem
from support.properties import model_inputs
from support.configs import model_configs
from support import REPO

CUDA = torch.device("cuda", 0)
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


@contextmanager
def fake_cuda():
    """Within the block, tensors moved to "cuda:0" are fake CUDA tensors (see the module doc);
    yields the mode."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


@contextmanager
def on_a_gpu():
    """What torch answers about CUDA on a machine with a GPU of native bf16: for code that asks
    before it builds something (torch.autocast("cuda") switches itself off without one)."""
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        yield


def cuda_autocast(dtype: torch.dtype = torch.bfloat16):
    """torch.autocast("cuda", dtype) as built on a machine with a GPU."""
    with on_a_gpu():
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
        if static_problem(model) is None:  # the static-shape step (CUDA graphs' path), the draw included
            fixed = StaticDecoder(model, 2, labels, source, temperature=0.8, seed=1)
            for k in steps:
                fixed.set_step(k)
                value = fixed()
                check_device(value, CUDA, f"the static decoder's value at step {k} ({dtype})")
                for name, t in list(fixed.named_buffers()) + list(fixed.named_parameters()):
                    check_device(t, CUDA, f"the static decoder's {name} ({dtype})")
            passes = StaticDecoder(model, 2, labels, source, window=3, draws=False)  # parallel decoding's
            values = torch.zeros(passes.inputs.shape, dtype=torch.long, device=CUDA)
            for k in steps:
                w = min(3, cfg.seq_len - k)
                out = passes.steps(k, values[:, : w - 1 if k == 0 else w])
                check_device(out, CUDA, f"the static decoder's pass at step {k} ({dtype})")
        # parallel decoding's passes of 3 positions, going back inside the last pass as a wrong
        # guess makes it (the cache's rewind and the local 2D regather included)
        W = 3
        decoder = IncrementalDecoder(model, 2, labels, source, window=W)
        values = torch.zeros((2, W) if cfg.output == "categorical" else (2, W, cfg.channels), dtype=torch.long, device=CUDA)
        ranges = torch.zeros(2, W, 3, dtype=torch.long, device=CUDA) if cfg.range_input else None
        for k in steps:
            w = min(W, cfg.seq_len - k)
            out = decoder.steps(k, values[:, : w - 1 if k == 0 else w], None if ranges is None else ranges[:, :w])
            check_device(out, CUDA, f"the decoder's output of a pass at step {k} ({dtype})")


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
                images = decoder.sample(2, labels, source, temperature=0.8, seed=1)
                check_device(images, CUDA, f"the images sampled ({dtype})")


def check_training_step_on_meta(config) -> None:
    """The backward pass and one optimizer step of `imagetx train` (imagetx.training.optim) on meta."""
    from imagetx.config import RunConfig
    from imagetx.training.optim import make_optimizer

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


@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(p).model.attention != "full"], ids=lambda p: p.stem)
def test_local_attention_takes_the_flash_kernel_on_fake_cuda(path):
    # where torch says the flash kernel runs (bf16 on a recent GPU; a fake device cannot say so
    # itself), the grouped local attention calls it, on the model's device (the forward pass: a
    # fake CUDA backward needs a driver; test_devices.py runs both on a GPU)
    config = tiny(load_config(path).model)
    model = ImageTransformer(config)
    x, labels, source = model_inputs(config, batch=2)
    calls = []
    flash = attention._flash

    def spy(*args, **kwargs):
        calls.append(args[0].device)
        return flash(*args, **kwargs)

    with fake_cuda(), mock.patch("imagetx.model.attention.can_use_flash_attention", return_value=True), \
            mock.patch.object(attention, "_flash", spy):
        model.to(CUDA).train()
        x, labels, source = on(CUDA, x, labels, source)
        with cuda_autocast():
            nll = model.nll(x, labels, source)
        check_device(nll, CUDA, "the bf16 training nll through the flash kernel")
    assert calls and set(calls) == {CUDA}


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
@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(model_configs())
def test_drawn_config_runs_and_samples_on_fake_cuda(config):
    # whole images through generate where they are short (a fake step costs milliseconds)
    check_model_on_fake_cuda(config, decode="sample" if config.seq_len <= 64 else "steps")


@settings(max_examples=30, deadline=None)
@given(model_configs())
def test_drawn_config_trains_on_meta(config):
    check_training_step_on_meta(config)


# ---- the library functions behind the commands ------------------------------------------------
def _deepcopy_tensor(self, memo):
    """Tensor.__deepcopy__ as fake mode can run it: a fake tensor's copy is its clone() (torch
    cannot deepcopy one: its storage is on no device); a real one's is made outside the mode."""
    if isinstance(self, FakeTensor):
        memo[id(self)] = copy_ = self.detach().clone().requires_grad_(self.requires_grad)
        return copy_
    with unset_fake_temporarily():
        return _TENSOR_DEEPCOPY(self, memo)


_TENSOR_DEEPCOPY = torch.Tensor.__deepcopy__


def _built_on_the_cpu(config):
    """ImageTransformer(config) built outside the fake mode, as every command builds it: on the
    CPU, then moved to its device."""
    with unset_fake_temporarily():
        return ImageTransformer(config)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_builds_and_steps_on_fake_cuda(tmp_path, monkeypatch, precision):
    """imagetx train's set-up (model, optimizer, schedule, the moving average) on "cuda:0", the
    forward of a training step under its own autocast, and an optimizer step (gradients of the
    parameters' shape: the backward runs on meta, test_shipped_config_trains_on_meta)."""
    import imagetx.train
    from imagetx.system.distributed import Dist
    from imagetx.system.precision import resolve

    config = load_config(sets=[*TINY_MODEL, "model.num_classes=3", "train.ema=0.9", "train.compile=false",
                               f"train.precision={precision}", f"train.out={tmp_path / 'run'}"])
    monkeypatch.setattr(imagetx.train, "ImageTransformer", _built_on_the_cpu)
    monkeypatch.setattr(torch.Tensor, "__deepcopy__", _deepcopy_tensor)
    with on_a_gpu():
        autocast = resolve(precision, CUDA).autocast(CUDA)  # as the trainer's
    trainer = imagetx.train.Trainer(config, Dist(device=CUDA))
    trainer.train_set = range(8)  # what load_data reads from disk: build only needs its length
    x, labels, _ = model_inputs(config.model, batch=2)
    with fake_cuda(), mock.patch("imagetx.system.precision.cuda_native_bf16", return_value=True):
        trainer.build(None)
        assert {p.device for p in trainer.state.model.parameters()} == {CUDA}
        assert {p.device for p in trainer.state.ema.module.parameters()} == {CUDA}
        with autocast:
            nll = trainer.objective(*on(CUDA, x.to(torch.uint8), labels))
        check_device(nll, CUDA, "the training objective")
        for p in trainer.state.model.parameters():
            p.grad = torch.zeros_like(p)
        trainer.state.optimizer.step()
        trainer.state.ema.update(trainer.state.model)
        trainer.state.scheduler.step()
        for p in trainer.state.model.parameters():
            check_device(p, CUDA, "a parameter after the optimizer step")
        for state in trainer.state.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim():
                    check_device(value, CUDA, "the optimizer's state")


@pytest.mark.parametrize("extra", [dict(num_classes=3), dict(source_size=(4, 4), encoder_layers=1)],
                         ids=["class-conditional", "super-resolution"])
def test_eval_bpd_pass_on_fake_cuda(extra):
    """eval-bpd's pass over a data set (evaluate.nll_sums: CPU batches moved to the device, fp32
    and bf16) reads nothing back and sums on the device."""
    import imagetx.eval_bpd
    from imagetx.system.precision import FP32
    from support.datasets import Images

    read = imagetx.eval_bpd.batches

    def batches_read_on_the_cpu(*args, **kwargs):
        """The data loader's batches, read as real CPU work outside the mode, then handed to the
        step as the (fake) CPU tensors they are."""
        it = read(*args, **kwargs)
        while True:
            with unset_fake_temporarily():
                batch = next(it, None)
            if batch is None:
                return
            yield tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in batch)

    config = tiny(ModelConfig(image_size=(8, 8), channels=3, attention="local2d", query_shape=(2, 8),
                              memory_flange=(2, 4), **extra))
    dataset = Images(5, config.image_size, num_classes=config.num_classes, source_size=config.source_size)
    model = ImageTransformer(config).eval()
    with fake_cuda() as mode, mock.patch.object(imagetx.eval_bpd, "batches", batches_read_on_the_cpu):
        model.to(CUDA)
        for precision in (FP32, SimpleNamespace(autocast=lambda device: cuda_autocast())):  # fp32, bf16
            totals = imagetx.eval_bpd.nll_sums(model, dataset, [range(0, 3), range(3, 5)], CUDA, precision=precision)
            check_device(totals, CUDA, "eval-bpd's sums")


@pytest.mark.parametrize("consistent", [False, True])
def test_super_resolve_on_fake_cuda(consistent):
    """superres's decoding (superres.super_resolve: sources from the CPU, repeated, decoded in
    batches, with consistent sampling's AreaConsistency) on "cuda:0"."""
    from imagetx.superres import super_resolve

    config = tiny(ModelConfig(image_size=(4, 4), channels=1, attention="local1d", block_length=8,
                              source_size=(2, 2), encoder_layers=1, source_skip=True))
    model = ImageTransformer(config).eval()
    sources = torch.randint(0, 256, (2, 2, 2, 1), dtype=torch.uint8)
    with fake_cuda():
        model.to(CUDA)
        images = super_resolve(model, sources, samples=2, batch_size=3, consistent=consistent)
    assert tuple(images.shape) == (2, 2, 4, 4, 1)
