"""The paths a GPU takes, run on every device this machine has: CPU always, CUDA when present.

Each test takes `device`; its CUDA case is marked `cuda` and skipped without a GPU
(`benchmarks/gpu_check.sh` runs them with `-m cuda`). On CPU the same code runs wherever the
path allows it: local 1D through the key windows and additive mask that CUDA takes
(`windowed_local1d`), bf16 autocast, and torch.compile (slow on CPU: marked `slow`, so the fast tier leaves it out). What only
a GPU can show (NCCL, eval-bpd on CUDA against CPU) is CUDA-only.

- every attention pattern's fast path (and both outputs, class labels, the encoder-decoder)
  against a float64 dense reference, in outputs and gradients;
- the cached decoder equals the full forward pass;
- sampling through the static-shape step, captured as a CUDA graph on a GPU, draws the eager
  decoder's images;
- bf16 autocast training steps lower the loss;
- torch.compile training steps equal eager ones within tolerance;
- a compiled training step is one graph, compiled once (no graph break, no recompile);
- `imagetx train` from the command line; `eval-bpd` on CUDA equals CPU; torchrun with NCCL.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from imagetx import ImageTransformer, ModelConfig
from imagetx.model import grouped_local_attention, reference_mode, windowed_local1d
from imagetx.system.precision import resolve
from support.configs import TINY_MODEL
from support.properties import check_cache_equals_full_pass, model_inputs
from support import REPO as ROOT

HAS_CUDA = torch.cuda.is_available()
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# Small geometries that still have several blocks, a padded edge and a flange wider than its block.
CASES = {
    "local1d": dict(attention="local1d", block_length=16),
    "local1d-dmol-classes": dict(attention="local1d", block_length=12, output="dmol", num_mixtures=3, num_classes=3),
    "local2d": dict(attention="local2d", query_shape=(2, 6), memory_flange=(1, 9)),
    "full": dict(attention="full"),
    "superres-local2d": dict(attention="local2d", query_shape=(2, 6), memory_flange=(2, 3), source_size=(3, 3),
                             encoder_layers=1, source_skip=True),
}


def tiny_model(**extra) -> ImageTransformer:
    torch.manual_seed(0)
    cfg = dict(image_size=(6, 5), channels=3, n_layers=2, d_model=32, n_heads=2, d_ff=48, dropout=0.0)
    return ImageTransformer(ModelConfig(**{**cfg, **extra}))


@pytest.fixture(autouse=True)
def exact_cuda_float32():
    """No TF32 in CUDA matmuls and convolutions while comparing with float64."""
    if not HAS_CUDA:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def outputs_and_grads(model, x, labels, source):
    model.zero_grad()
    out = model(x, labels, source)
    model.nll(x, labels, source).sum().backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().double().cpu(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_fast_paths_equal_the_float64_dense_reference(device, case):
    model = tiny_model(**CASES[case]).train()  # train mode: the paths training takes (no dropout)
    x, labels, source = model_inputs(model.config, batch=2)
    reference = copy.deepcopy(model).double()
    with reference_mode():
        ref_out, ref_grads = outputs_and_grads(reference, x, labels, source)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    model.to(device)
    paths = {"fast": nullcontext}  # local 2D's, and on CUDA local 1D's, is the grouped path
    if model.config.attention == "local1d":
        paths["windowed local 1D"] = windowed_local1d  # CPU attention dropout's path
        paths["grouped"] = grouped_local_attention  # CUDA's path, also on CPU
    for name, path in paths.items():
        with path():
            out, grads = outputs_and_grads(model, move(x), move(labels), move(source))
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} path, outputs: {m}")
        assert grads.keys() == ref_grads.keys()
        for key, ref in ref_grads.items():
            err, scale = float((grads[key] - ref).abs().max()), float(ref.abs().max()) + 1e-12
            assert err <= 1e-4 * scale, f"{name} path on {device}: gradient of {key} off by {err:.3g} (scale {scale:.3g})"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]["attention"] != "full"])
def test_local_attention_through_the_flash_kernel_in_bf16_follows_the_pattern(case):
    # bf16 on CUDA: the grouped path's lower-right causal attention takes the flash kernel (fp32
    # above takes the masked one); a kernel aligned otherwise (top-left) would miss whole key
    # ranges, far beyond bf16's rounding
    model = tiny_model(**CASES[case]).train()
    x, labels, source = model_inputs(model.config, batch=2)
    reference = copy.deepcopy(model).double()
    with reference_mode():
        ref_out, ref_grads = outputs_and_grads(reference, x, labels, source)
    model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads = outputs_and_grads(model, *(None if t is None else t.cuda() for t in (x, labels, source)))
    err = float((out - ref_out).abs().max() / ref_out.abs().max())
    assert err < 3e-2, f"bf16 flash path off by {err:.3g} of the outputs' scale"
    for key, ref in ref_grads.items():
        err = float((grads[key] - ref).abs().max() / (ref.abs().max() + 1e-12))
        assert err < 1e-1, f"bf16 flash path: gradient of {key} off by {err:.3g} of its scale"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_cache_equals_full_pass(device, case):
    model = tiny_model(**CASES[case]).to(device).eval()
    x, labels, source = (None if t is None else t.to(device) for t in model_inputs(model.config, batch=2))
    check_cache_equals_full_pass(model, x, labels, source)
    g = torch.Generator(device).manual_seed(0)
    images = model.sample(2, labels, source, generator=g)
    assert images.dtype == torch.uint8 and images.device.type == device


def train_losses(model, x, device, steps: int, precision: str = "fp32", compile_: bool = False) -> list[float]:
    """Losses of `steps` Adam steps on one fixed batch (bits/dim)."""
    model.to(device).train()
    x = x.to(device)
    p = resolve(precision, torch.device(device))
    nll = torch.compile(model.nll) if compile_ else model.nll
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        with p.autocast(torch.device(device)):
            loss = nll(x).mean() / (model.config.num_dims * 0.6931471805599453)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_graph_captured_decoding_draws_the_eager_decoders_images(device, case):
    # on CUDA, sampling takes the static-shape step, captured as a CUDA graph (model/static.py);
    # float64, where summing in another order flips no draw
    model = tiny_model(**CASES[case]).double().to(device).eval()
    _, labels, source = (None if t is None else t.to(device) for t in model_inputs(model.config, batch=2))
    eager = model.sample(2, labels, source, seed=9, static=False)
    fixed = model.sample(2, labels, source, seed=9)
    assert torch.equal(fixed, eager if device == "cuda" else model.sample(2, labels, source, seed=9, static=True))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_training_steps_lower_the_loss(device):
    model = tiny_model(**CASES["local1d"])
    x, _, _ = model_inputs(model.config, batch=4)
    losses = train_losses(model, x, device, steps=12, precision="bf16")
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=CUDA)])
def test_compiled_training_steps_equal_eager(device):
    eager_model = tiny_model(**CASES["local1d"])
    compiled_model = copy.deepcopy(eager_model)
    x, _, _ = model_inputs(eager_model.config, batch=2)
    eager = train_losses(eager_model, x, device, steps=4)
    compiled = train_losses(compiled_model, x, device, steps=4, compile_=True)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-4)
    for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


COMPILE_CASES = {
    **{k: CASES[k] for k in ("local1d", "local2d", "full", "superres-local2d")},
    "consistent-range-input": dict(attention="local1d", block_length=16, source_size=(3, 5), encoder_layers=1,
                                   consistent=True, range_input=True, num_classes=2),
}


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiled_training_step_is_one_graph_compiled_once(case):
    """torch.compile on the training objective: three steps (new batches, optimizer steps in
    between) trace one graph, with no graph break (a value read back, an unsupported call) and
    no recompile (module state changed inside the compiled region). Dynamo's counters do not
    depend on the backend, so aot_eager shows here what Inductor would get on a GPU, on the
    path CUDA takes (windowed local 1D)."""
    from torch._dynamo.utils import counters

    from imagetx.train import Objective

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(**{**COMPILE_CASES[case], "dropout": 0.1}).train()
    objective = torch.compile(Objective(model), backend="aot_eager")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with windowed_local1d():
        for step in range(3):
            x, labels, source = model_inputs(model.config, batch=2, seed=step)
            objective(x, labels, source).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    breaks = {reason.splitlines()[0]: n for reason, n in counters["graph_break"].items()}
    assert not breaks, f"graph breaks: {breaks}"
    assert counters["stats"]["unique_graphs"] == 1, f"{counters['stats']['unique_graphs']} graphs compiled in 3 steps"


TRAIN = [*TINY_MODEL, "train.batch_size=4", "train.log_every=1", "train.eval_every=0", "train.sample_every=0",
         "train.checkpoint_every=0", "train.max_steps=3"]


def train_cli(out: Path, device: str, *extra: str):
    from support.cli import invoke

    return invoke("train", "--out", out, "--device", device, *[a for s in (*TRAIN, *extra) for a in ("--set", s)])


@pytest.mark.parametrize("device", DEVICES)
def test_imagetx_train_from_the_command_line(tmp_path, device):
    result = train_cli(tmp_path / "run", device)  # on CUDA: bf16 autocast and torch.compile by "auto"
    assert result.exit_code == 0, (result.output, result.exception)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(map(lambda r: r["loss"] == r["loss"], rows))  # finite, not NaN


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_eval_bpd_on_cuda_equals_cpu(tmp_path):
    from imagetx import eval_bpd

    assert train_cli(tmp_path / "run", "cpu").exit_code == 0
    bpd = {
        device: eval_bpd.run(eval_bpd.EvalConfig(tmp_path / "run", limit=64, batch_size=16, device=device,
                                                 progress=False))["bpd"]
        for device in ("cpu", "cuda")
    }
    assert bpd["cuda"] == pytest.approx(bpd["cpu"], rel=1e-5), bpd


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_torchrun_with_nccl_on_every_gpu(tmp_path):
    gpus = torch.cuda.device_count()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sets = [a for s in (*TRAIN, "train.compile=false") for a in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
         "-m", "imagetx.cli", "train", "--device", "cuda", "--out", str(tmp_path / "run"), *sets],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    from imagetx.storage.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ckpt["step"] == 3 and ckpt["world_size"] == gpus
