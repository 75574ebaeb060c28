"""Exact bits/dim: equal to a direct computation from the model's logits, for every kind of model."""

from __future__ import annotations

import math

import pytest
import torch

from imagetx.errors import ConfigError, RunError
from imagetx.eval_bpd import evaluate_bpd
from imagetx.model.config import ModelConfig
from imagetx.model.transformer import ImageTransformer
from support.datasets import Images

TINY = dict(image_size=(3, 4), channels=3, n_layers=1, d_model=16, n_heads=2, d_ff=32, block_length=8, dropout=0.2)


def direct_bpd(model, ds: Images, n: int) -> float:
    """Sum of -log softmax(logits)[value] over every sub-pixel of the first n images, in float64."""
    model.eval()
    labels = ds.labels[:n] if ds.labels is not None else None
    source = ds.source[:n] if ds.source is not None else None
    with torch.no_grad():
        logits = model(ds.x[:n], labels=labels, source=source).double()  # (n, H, W, C, 256)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ds.x[:n].long()[..., None])
    return -logp.sum().item() / (n * model.config.num_dims * math.log(2))


@pytest.mark.parametrize(
    "extra",
    [{}, dict(num_classes=3), dict(source_size=(2, 2), encoder_layers=1), dict(attention="local2d", query_shape=(2, 4))],
    ids=["unconditional", "class-conditional", "super-resolution", "local2d"],
)
def test_bpd_equals_direct_computation_from_logits(extra):
    torch.manual_seed(0)
    model = ImageTransformer(ModelConfig(**{**TINY, **extra})).train()
    ds = Images(10, TINY["image_size"], num_classes=extra.get("num_classes", 0), source_size=extra.get("source_size"))
    result = evaluate_bpd(model, ds, batch_size=3, limit=7)
    assert model.training  # the caller's mode is restored
    assert result["images"] == 7 and result["split"] == "test" and result["dataset"] == "random test images"
    assert result["bpd"] == pytest.approx(direct_bpd(model, ds, 7), rel=1e-6)
    assert result["nll_nats"] == pytest.approx(result["bpd"] * 36 * math.log(2), rel=1e-12)
    again = evaluate_bpd(model, ds, batch_size=7, limit=7)  # eval mode: no dropout, deterministic
    assert again["bpd"] == pytest.approx(result["bpd"], rel=1e-6)
    assert evaluate_bpd(model, ds, batch_size=4)["images"] == 10


def test_dmol_bpd_is_the_sum_of_model_nll():
    torch.manual_seed(0)
    model = ImageTransformer(ModelConfig(**{**TINY, "output": "dmol", "num_mixtures": 2})).eval()
    ds = Images(5, TINY["image_size"])
    with torch.no_grad():
        nll = model.nll(ds.x).double().sum().item()
    assert evaluate_bpd(model, ds, batch_size=2)["bpd"] == pytest.approx(nll / (5 * 36 * math.log(2)), rel=1e-6)


def test_data_that_cannot_feed_the_model_is_a_clear_error():
    model = ImageTransformer(ModelConfig(**{**TINY, "num_classes": 3}))
    with pytest.raises(RunError, match="class-conditional .* has no labels"):
        evaluate_bpd(model, Images(4, TINY["image_size"]))
    with pytest.raises(RunError, match=r"has 4x4 images but the model expects \(3, 4\)"):
        evaluate_bpd(ImageTransformer(ModelConfig(**TINY)), Images(4, (4, 4)))


def test_eval_config_lists_every_problem():
    from imagetx.eval_bpd import EvalConfig, run

    config = EvalConfig("missing.pt", limit=0, batch_size=0, num_workers=-1, device="tpu")
    assert len(config.problems()) == 4 and all("\n" not in p for p in config.problems())
    with pytest.raises(ConfigError) as info:
        run(config)  # before looking for the checkpoint
    assert info.value.problems == config.problems()


def test_source_model_gives_the_chain_rule_total(tmp_path):
    """eval-bpd --source-model: the inputs' bits under a model of them, per input and per target
    dimension, and conditional + input bits as one total, from the CLI."""
    import json

    from typer.testing import CliRunner

    from imagetx.storage.checkpoint import make_checkpoint, save_checkpoint
    from imagetx.cli import app
    from imagetx.config import DataConfig
    from imagetx.data.batches import dataset_for

    data = {"name": "builtin", "task": "superres", "builtin_size": 8}
    torch.manual_seed(0)
    sr = ImageTransformer(ModelConfig(**{**TINY, "image_size": (8, 8), "source_size": (2, 2), "encoder_layers": 1}))
    source = ImageTransformer(ModelConfig(**{**TINY, "image_size": (2, 2), "block_length": 4}))
    sr_path = save_checkpoint(tmp_path / "sr", make_checkpoint(model=sr, config={"model": sr.config.to_dict(), "data": data}, step=1))
    src_path = save_checkpoint(tmp_path / "src", make_checkpoint(model=source, config={"model": source.config.to_dict()}, step=1))

    result = CliRunner().invoke(app, ["eval-bpd", str(sr_path), "--source-model", str(src_path), "--limit", "5", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])

    items = [dataset_for(sr.config, DataConfig(**data), "test")[i] for i in range(5)]
    targets, sources = torch.stack([torch.as_tensor(t) for t, _, _ in items]), torch.stack([torch.as_tensor(s) for _, s, _ in items])
    with torch.no_grad():
        cond = sr.eval().nll(targets, source=sources).double().mean().item()
        src = source.eval().nll(sources).double().mean().item()
    assert out["bpd"] == pytest.approx(cond / (8 * 8 * 3 * math.log(2)), rel=1e-6)
    assert out["source_bpd"] == pytest.approx(src / (2 * 2 * 3 * math.log(2)), rel=1e-6)
    assert out["source_bits_per_target_dim"] == pytest.approx(src / (8 * 8 * 3 * math.log(2)), rel=1e-6)
    assert out["chain_bpd"] == pytest.approx(out["bpd"] + out["source_bits_per_target_dim"], rel=1e-12)
    table = CliRunner().invoke(app, ["eval-bpd", str(sr_path), "--source-model", str(src_path), "--limit", "5"])
    assert table.exit_code == 0 and "chain-rule total" in table.stdout

    # a source model of the wrong size, or one for a model that has no input: one usage error
    wrong = ImageTransformer(ModelConfig(**{**TINY, "image_size": (4, 4)}))
    wrong_path = save_checkpoint(tmp_path / "wrong", make_checkpoint(model=wrong, config={"model": wrong.config.to_dict()}, step=1))
    for model_path, source_path, message in [(sr_path, wrong_path, "makes 4x4x3 images; this model's inputs are 2x2x3"),
                                             (src_path, src_path, "needs a super-resolution checkpoint")]:
        result = CliRunner().invoke(app, ["eval-bpd", str(model_path), "--source-model", str(source_path)])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
