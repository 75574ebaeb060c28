"""train.logger: TensorBoard event files read back (scalars, a sample grid, the config), W&B in
offline mode, and a missing package as one line naming the pip command."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from imagetx import train
from imagetx.cli import app
from imagetx.config import load_config
from imagetx.errors import ConfigError, RunError
from imagetx.training import loggers
from support.configs import TINY_MODEL

TINY = [*TINY_MODEL, "train.batch_size=4", "train.max_steps=4", "train.log_every=2", "train.eval_every=4",
        "train.eval_images=4", "train.sample_every=4", "train.sample_count=4", "train.checkpoint_every=0"]


def test_tensorboard_event_files_hold_scalars_image_and_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    summary = train.run(load_config(sets=[*TINY, f"train.out={out}", "train.logger=tensorboard"]))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/bpd", "train/lr", "train/grad_norm", "train/images_per_sec", "eval/bpd"):
        assert tag in tags["scalars"], tag
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_bpd" in r]
    logged = events.Scalars("train/bpd")
    assert [e.step for e in logged] == [r["step"] for r in train_rows] == [2, 4]
    assert [e.value for e in logged] == pytest.approx([r["train_bpd"] for r in train_rows], rel=1e-6)
    assert events.Scalars("eval/bpd")[0].value == pytest.approx(summary["eval_bpd"], rel=1e-6)
    image = events.Images("samples")[0]
    assert image.step == 4 and image.width > 8 and image.encoded_image_string.startswith(b"\x89PNG")
    assert "config" in "".join(tags["tensors"])


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    out = tmp_path / "run"
    summary = train.run(load_config(sets=[*TINY, f"train.out={out}", "train.logger=wandb"]))
    assert summary["status"] == "completed"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (out / "metrics.jsonl").is_file()  # always written


def test_unknown_and_missing_loggers(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.logger must be one of none, tensorboard, wandb; got 'mlflow'"):
        load_config(sets=[*TINY, "train.logger=mlflow"]).validate()
    for name in ("wandb", "tensorboard"):  # as if not installed
        monkeypatch.setitem(loggers._PACKAGES, name, ("imagetx_no_such_module", f"imagetx[{name}]"))
    with pytest.raises(RunError, match=r"pip install 'imagetx\[wandb\]'"):
        train.run(load_config(sets=[*TINY, f"train.out={tmp_path / 'a'}", "train.logger=wandb"]))
    assert not (tmp_path / "a").exists()  # checked before anything is written
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "b"), "--set", "train.logger=tensorboard",
                                      *[a for s in TINY for a in ("--set", s)]])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "pip install 'imagetx[tensorboard]'" in result.output
