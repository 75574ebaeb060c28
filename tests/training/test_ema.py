"""train.ema: the moving average of the weights, what it is, where it is saved, and who uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.configs import TINY_MODEL
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from imagetx import train
from imagetx.cli import app
from imagetx.config import load_config
from imagetx.errors import CheckpointError, ConfigError
from imagetx.storage.checkpoint import latest_checkpoint, load_checkpoint
from imagetx.storage.weights import load_model
from imagetx.training.optim import WeightAverage, ema_decay

TINY = [
    *TINY_MODEL, "train.batch_size=4", "train.warmup_steps=3", "train.log_every=1", "train.eval_every=3",
    "train.eval_images=8", "train.sample_every=0", "train.checkpoint_every=0",
]


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def close(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@settings(max_examples=25, deadline=None)
@given(decay=st.floats(0.0, 0.9999), steps=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_the_average_follows_its_recurrence(decay, steps, seed):
    """avg_0 = initial weights; after step t, avg = d_t avg + (1 - d_t) w_t with
    d_t = min(decay, (1 + t) / (10 + t)): checked in float64 against arbitrary weight paths."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    expected = [p.detach().double().clone() for p in model.parameters()]
    average = WeightAverage(model, decay)
    for t in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(model)
        d = min(decay, (1 + t) / (10 + t))
        assert ema_decay(t, decay) == d
        expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, model.parameters())]
    for e, a in zip(expected, average.module.parameters()):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)
        assert not a.requires_grad


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ema") / "run"
    summary = train.run(load_config(sets=[*TINY, f"train.out={out}", "train.max_steps=6", "train.ema=0.9"]))
    assert summary["status"] == "completed"
    return out


def test_a_run_saves_the_average_and_evaluates_with_it(ema_run):
    ckpt = load_checkpoint(latest_checkpoint(ema_run))
    assert set(ckpt["ema"]) == set(ckpt["model"]) and not close(ckpt["ema"], ckpt["model"])
    # what the run logged at its last evaluation is the average's bits/dim, not the trained weights'
    logged = [json.loads(line) for line in (ema_run / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in logged if "eval_bpd" in r][-1]
    from imagetx.eval_bpd import EvalConfig
    from imagetx.eval_bpd import run as evaluate

    averaged = evaluate(EvalConfig(ema_run, limit=8, progress=False, device="cpu"))
    trained = evaluate(EvalConfig(ema_run, limit=8, progress=False, device="cpu", weights="trained"))
    assert averaged["bpd"] == pytest.approx(last_eval["eval_bpd"], abs=1e-9)
    assert trained["bpd"] != averaged["bpd"]
    assert averaged["weights"] == "the moving average of the weights (train.ema 0.9)"
    assert trained["weights"] == "the trained weights"


def test_every_reader_takes_the_average_unless_told(ema_run, tmp_path):
    ckpt = load_checkpoint(latest_checkpoint(ema_run))
    assert close(ckpt["ema"], load_model(ema_run).state_dict())
    assert close(ckpt["ema"], load_model(ema_run, weights="ema").state_dict())
    assert close(ckpt["model"], load_model(ema_run, weights="trained").state_dict())
    result = invoke("eval-bpd", ema_run, "--limit", 4, "--device", "cpu", "--json", "--weights", "trained")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"] == "the trained weights"
    # an export holds the average (config.json says so) and only it
    result = invoke("export", ema_run, "--out", tmp_path / "m", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"] == "ema"
    assert json.loads((tmp_path / "m" / "config.json").read_text())["weights"] == "ema"
    assert "moving average" in (tmp_path / "m" / "README.md").read_text()
    assert close(ckpt["ema"], load_model(tmp_path / "m").state_dict())
    with pytest.raises(CheckpointError, match="this export holds the moving average of the weights .* only"):
        load_model(tmp_path / "m", weights="trained")
    result = invoke("export", ema_run, "--out", tmp_path / "t", "--weights", "trained", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["weights"] == "trained"
    assert close(ckpt["model"], load_model(tmp_path / "t").state_dict())
    out = tmp_path / "s.png"
    result = invoke("sample", ema_run, "-n", 2, "--device", "cpu", "--out", out, "--weights", "ema")
    assert result.exit_code == 0 and out.exists(), result.output


def test_asking_for_an_average_a_run_did_not_keep_is_one_line(tmp_path):
    out = tmp_path / "plain"
    train.run(load_config(sets=[*TINY, f"train.out={out}", "train.max_steps=2", "train.eval_every=0"]))
    assert load_checkpoint(latest_checkpoint(out))["ema"] is None
    assert close(load_checkpoint(latest_checkpoint(out))["model"], load_model(out).state_dict())
    result = invoke("eval-bpd", out, "--device", "cpu", "--weights", "ema")
    assert result.exit_code == 1 and "holds no moving average of its weights" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    result = invoke("sample", out, "--device", "cpu", "--weights", "best", "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "--weights must be one of auto, ema, trained" in result.stderr
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ConfigError, match="train.ema must be in"):
        load_config(sets=[*TINY, "train.ema=1.0"]).validate()


def test_turning_the_average_on_when_resuming_starts_it_from_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    base = [*TINY, f"train.out={out}", "train.eval_every=0"]
    train.run(load_config(sets=[*base, "train.max_steps=2"]))
    before = load_checkpoint(latest_checkpoint(out))["model"]
    train.run(load_config(sets=[*base, "train.max_steps=3", "train.ema=0.5"]), resume="auto")
    assert "holds no moving average of the weights" in capsys.readouterr().err
    after = load_checkpoint(latest_checkpoint(out))
    d = (1 + 3) / (10 + 3)  # after step 3: min(0.5, (1 + 3) / (10 + 3)), the warm-up's
    for name, value in after["ema"].items():
        torch.testing.assert_close(value, d * before[name] + (1 - d) * after["model"][name])
