"""Precision: how "auto" decides, what a run says about it, and what bf16 costs in accuracy.

bf16 is mixed precision: a trained model's bits/dim under bf16 stay within 0.01 of the exact fp32
value, and its bf16 cached decoder's conditionals stay close to fp32's. The drawn-configuration
properties of the bf16 paths are in test_properties.py.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from typer.testing import CliRunner

from imagetx import train
from imagetx.cli import app
from imagetx.config import load_config
from imagetx.data.batches import dataset_for
from imagetx.eval_bpd import evaluate_bpd
from imagetx.model.decoding import for_decoding, teacher_forced_outputs
from imagetx.storage.weights import load_model
from imagetx.system import precision
from imagetx.system.cpu import bf16_features
from support.configs import TINY_MODEL
from support.properties import model_outputs, total_variation

AMD_ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
INTEL_AMX = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
OLDER = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"


@pytest.mark.parametrize("cpuinfo, features", [
    (AMD_ZEN4, ("avx512_bf16",)), (INTEL_AMX, ("amx_bf16", "avx512_bf16")), (OLDER, ()), ("", ()),
])
def test_native_bf16_is_read_from_the_processor_flags(cpuinfo, features):
    assert bf16_features(cpuinfo) == features


def test_auto_picks_bf16_where_it_is_native_and_says_why(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ("amx_bf16",))
    p = precision.resolve("auto", "cpu")
    assert p.bf16 and p.dtype == torch.bfloat16 and "AMX-BF16" in p.describe()
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ())
    p = precision.resolve("auto", "cpu")
    assert not p.bf16 and "no native bf16" in p.describe()
    assert not precision.resolve("fp32", "cuda").bf16


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cuda_picks_bf16_only_where_the_gpu_has_it_natively(monkeypatch, native):
    """torch >= 2.4 calls a GPU that only emulates bf16 (compute capability < 8.0, e.g. a T4 or
    V100) "supported"; auto must ask about native support, and bf16 forced there warns."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    p = precision.resolve("auto", torch.device("cuda", 0))
    assert p.bf16 == native and asked == [False]
    assert ("this GPU has native bf16" if native else "no native bf16 (it needs compute capability 8.0") in p.describe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert precision.resolve("bf16", "cuda").bf16
    assert [str(w.message) for w in caught if "emulated and slowly" in str(w.message)] == ([] if native else [
        "bf16 was chosen but this GPU has no native bf16 (it needs compute capability 8.0 or more: Ampere or newer): "
        "it runs, emulated and slowly; fp32 (precision auto or fp32) is faster here"])


def test_auto_on_cuda_with_a_torch_that_has_no_emulation_keyword(monkeypatch):
    """Before the keyword existed, is_bf16_supported() counted native support only."""
    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda native=native: native)
        assert precision.resolve("auto", "cuda").bf16 == native


def test_bf16_forced_without_native_support_runs_with_a_warning(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ())
    with pytest.warns(UserWarning, match="bf16 was chosen but this CPU has no native bf16.*slowly"):
        assert precision.resolve("bf16", "cpu").bf16
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ("avx512_bf16",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.resolve("bf16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16; got 'fp16'"):
        precision.resolve("fp16", "cpu")


@pytest.mark.parametrize("choice, expected", [("fp32", "fp32 (chosen)"), ("bf16", "bf16 mixed precision (chosen)")])
def test_the_first_line_of_a_run_names_its_precision(tmp_path, capsys, choice, expected):
    config = load_config(sets=[*TINY_MODEL, f"train.out={tmp_path / 'run'}", "train.max_steps=2",
                               "train.batch_size=2", f"train.precision={choice}", "train.eval_every=0",
                               "train.sample_every=0"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # forced bf16 warns on a processor without it
        train.run(config)
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("starting a new run in ") and first.endswith(expected), first


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small local 1D model trained for 150 steps on the built-in shapes, in fp32."""
    out = tmp_path_factory.mktemp("precision") / "run"
    config = load_config(sets=[
        *TINY_MODEL, "model.d_model=32", "model.d_ff=64", "model.n_layers=2", "model.dropout=0",
        f"train.out={out}", "train.max_steps=150", "train.batch_size=16", "train.lr=3e-3",
        "train.warmup_steps=10", "train.precision=fp32", "train.eval_every=0", "train.sample_every=0",
    ])
    train.run(config)
    model = load_model(out, device="cpu")
    return model, dataset_for(model.config, config.data, "test"), out


def test_bf16_bits_per_dim_are_within_a_hundredth_of_exact(trained):
    model, ds, _ = trained
    exact = evaluate_bpd(model, ds, limit=256)
    approx = evaluate_bpd(model, ds, limit=256, precision=precision.resolve("bf16", "cpu"))
    assert exact["precision"] == "fp32" and not exact["approximate"]
    assert approx["precision"] == "bf16" and approx["approximate"]
    assert exact["bpd"] < 3.0  # trained: far from the 8 bits/dim of a uniform model
    assert abs(approx["bpd"] - exact["bpd"]) <= 0.01, (approx["bpd"], exact["bpd"])


def test_bf16_decoder_conditionals_are_close_to_fp32_on_a_trained_model(trained):
    model, ds, _ = trained
    x = torch.stack([ds[i][0] for i in range(8)])
    full = model_outputs(model, x).log_softmax(-1)
    bf16 = teacher_forced_outputs(for_decoding(model, torch.bfloat16, 8), x).float().log_softmax(-1)
    tv = total_variation(bf16, full)
    assert float(tv.mean()) <= 0.01 and float(tv.max()) <= 0.05, (float(tv.mean()), float(tv.max()))


def test_bf16_training_lowers_the_loss_like_fp32(tmp_path):
    """The same 40 steps in fp32 and bf16 (dropout on): both learn, to nearly the same loss."""
    finals = {}
    for choice in ("fp32", "bf16"):
        out = tmp_path / choice
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train.run(load_config(sets=[
                *TINY_MODEL, "model.dropout=0.1", f"train.out={out}", "train.max_steps=40",
                "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=5", "train.log_every=1",
                f"train.precision={choice}", "train.eval_every=0", "train.sample_every=0",
            ]))
        losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        finals[choice] = sum(losses[-10:]) / 10
        assert finals[choice] < sum(losses[:5]) / 5 - 0.5, losses
    assert abs(finals["bf16"] - finals["fp32"]) <= 0.05 * finals["fp32"], finals


def _json_line(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("{")))


def test_eval_bpd_labels_bf16_approximate_in_every_report(trained):
    run_dir = trained[2]
    result = CliRunner().invoke(app, ["eval-bpd", str(run_dir), "--limit", "32", "--precision", "bf16", "--json"])
    assert result.exit_code == 0, result.output
    report = _json_line(result.output)
    assert report["precision"] == "bf16" and report["approximate"] is True
    table = CliRunner().invoke(app, ["eval-bpd", str(run_dir), "--limit", "32", "--precision", "bf16"])
    assert "Approximate bits/dim" in table.output and "(approximate)" in table.output
    exact = CliRunner().invoke(app, ["eval-bpd", str(run_dir), "--limit", "32", "--json"])
    assert _json_line(exact.output)["approximate"] is False
    bad = CliRunner().invoke(app, ["eval-bpd", str(run_dir), "--precision", "fp8"])
    assert bad.exit_code == 2 and "error: precision must be one of auto, fp32, bf16; got 'fp8'" in bad.output


@pytest.mark.parametrize("device, bf16, inside", [("cuda", False, "high"), ("cuda", True, "highest"),
                                                  ("cpu", False, "highest"), ("cpu", True, "highest")])
def test_fp32_training_multiplies_in_tf32_only_on_a_gpu(device, bf16, inside):
    # on CPU "high" would let oneDNN multiply float32 in bf16: fp32 training there stays exact
    assert torch.get_float32_matmul_precision() == "highest"
    with precision.training_matmuls(precision.Precision(bf16, "chosen"), torch.device(device)):
        assert torch.get_float32_matmul_precision() == inside
    assert torch.get_float32_matmul_precision() == "highest"


def test_held_out_bits_per_dim_stay_exact_inside_a_tf32_run(tmp_path, monkeypatch):
    # a GPU's fp32 run, simulated: its training steps multiply in TF32, its evaluations exactly
    seen = {"train": set(), "eval": set()}
    real_step, real_eval = train.Trainer.train_step, train.evaluate_bpd

    def step(self, stream):
        seen["train"].add(torch.get_float32_matmul_precision())
        return real_step(self, stream)

    def evaluate(*args, **kwargs):
        seen["eval"].add(torch.get_float32_matmul_precision())
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(train, "training_matmuls", lambda p, d: precision.float32_matmuls("high"))
    monkeypatch.setattr(train.Trainer, "train_step", step)
    monkeypatch.setattr(train, "evaluate_bpd", evaluate)
    config = load_config(sets=[*TINY_MODEL, f"train.out={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2",
                               "train.precision=fp32", "train.eval_every=1", "train.eval_images=4", "train.sample_every=0"])
    train.run(config)
    assert seen == {"train": {"high"}, "eval": {"highest"}}
    assert torch.get_float32_matmul_precision() == "highest"
