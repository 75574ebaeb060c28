"""`imagetx export`: a safetensors folder with config.json and a model card, loaded without
unpickling by load_model, sample, eval-bpd and superres; the folder appears whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imagetx import load_model, train
from imagetx.cli import app
from imagetx.config import load_config
from imagetx.errors import CheckpointError, RunError
from imagetx.export import export
from imagetx.model.transformer import ImageTransformer
from imagetx.storage.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from support.configs import TINY_MODEL

pytest.importorskip("safetensors")

TINY = [*TINY_MODEL, "train.batch_size=4", "train.max_steps=3", "train.log_every=1", "train.eval_every=3",
        "train.eval_images=4", "train.sample_every=3", "train.sample_count=4", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    train.run(load_config(sets=[*TINY, f"train.out={out}"]))
    return out


def test_round_trip_gives_identical_logits_and_never_unpickles(run_dir, tmp_path, monkeypatch):
    summary = export(run_dir, tmp_path / "model")
    assert summary["files"] == ["README.md", "config.json", "model.safetensors", "samples.png"]
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["model"]["d_model"] == 16 and meta["data"]["name"] == "builtin" and meta["step"] == 3
    assert meta["held_out"]["split"] == "test" and meta["held_out"]["images"] == 4
    card = (tmp_path / "model" / "README.md").read_text()
    assert meta["held_out"]["dataset"].startswith("builtin shapes 8x8")
    for words in ("builtin", "as read by imagetx: builtin shapes", "Held-out bits/dim", "`test` split (4 images", "3 optimizer steps", "samples.png",
                  "imagetx sample model", "imagetx eval-bpd model"):
        assert words in card, words

    original = load_model(run_dir)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("an export was unpickled"))
    exported = load_model(tmp_path / "model")
    x = torch.randint(0, 256, (2, 8, 8, 1))
    with torch.no_grad():
        assert torch.equal(original(x), exported(x))
    assert load_checkpoint(tmp_path / "model")["optimizer"] is None  # it samples and evaluates, not resumes


def test_commands_take_the_folder(run_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.output
    folder = str(tmp_path / "m")
    result = runner.invoke(app, ["eval-bpd", folder, "--limit", "4", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dataset"].startswith("builtin")
    result = runner.invoke(app, ["sample", folder, "-n", "2", "--out", str(tmp_path / "s.png"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.png").is_file()
    result = runner.invoke(app, ["train", "--out", str(run_dir), "--resume", folder])
    assert result.exit_code != 0 and "cannot continue" in result.output


def test_superres_takes_the_folder(tmp_path):
    from imagetx.superres import SuperResConfig, run
    from support.configs import tiny

    torch.manual_seed(0)
    cfg = tiny(attention="local1d", block_length=16, image_size=(8, 8), source_size=(2, 2), encoder_layers=1)
    data = {"name": "builtin", "task": "superres", "builtin_size": 8}
    ckpt = make_checkpoint(model=ImageTransformer(cfg), config={"model": cfg.to_dict(), "data": data}, step=1)
    path = save_checkpoint(tmp_path / "run", ckpt)
    export(path, tmp_path / "sr")  # a checkpoint file, from a run without metrics
    assert "imagetx superres sr" in (tmp_path / "sr" / "README.md").read_text()
    req = dict(dataset="builtin", num=1, out=tmp_path / "out", progress=False, precision="fp32", device="cpu")
    a = run(SuperResConfig(path, **req))
    b = run(SuperResConfig(tmp_path / "sr", **{**req, "out": tmp_path / "out2"}))
    assert a["inputs"] == b["inputs"] and a["written"] and b["written"]


def test_nonempty_target_and_failures_leave_nothing(run_dir, tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "full")])
    assert result.exit_code == 1 and "not empty" in result.output and result.output.count("\n") == 1
    assert (tmp_path / "full" / "x").read_text() == "keep me"

    (tmp_path / "empty").mkdir()
    export(run_dir, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "model.safetensors").is_file()

    import imagetx.export as ex

    stale = tmp_path / ".half.tmp-999999999"  # left by an export that was killed (no such process)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    monkeypatch.setattr(ex, "model_card", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(RunError, match="No space left"):
        export(run_dir, tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]


def test_damaged_exports_are_one_line(run_dir, tmp_path):
    export(run_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="its sha256 is not the one config.json records"):
        load_model(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    del meta["weights_sha256"]  # as exports written before the hash was recorded
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    result = CliRunner().invoke(app, ["sample", str(tmp_path / "m"), "--device", "cpu"])
    assert result.exit_code == 1 and "not readable JSON" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_an_export_missing_a_file_is_named_as_such(run_dir, tmp_path, missing):
    """Not taken for a run directory ("no checkpoints in DIR/checkpoints"): the export is
    incomplete, and the line names the file it lacks."""
    export(run_dir, tmp_path / "m")
    (tmp_path / "m" / missing).unlink()
    for command in (["sample", "--out", str(tmp_path / "s.png")], ["eval-bpd"], ["export", "--out", str(tmp_path / "e")]):
        result = CliRunner().invoke(app, [command[0], str(tmp_path / "m"), *command[1:]])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
        assert f"incomplete `imagetx export` folder: {missing} is missing" in result.stderr, result.stderr
        assert "no checkpoints" not in result.stderr
