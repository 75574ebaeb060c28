"""`imagetx plot` and RUN/curves.png: curves read from metrics.jsonl, drawn with matplotlib."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from imagetx import train
from imagetx.cli import app
from imagetx.config import load_config
from imagetx.errors import RunError
from imagetx.plot import plot_runs, read_curves
from support.configs import TINY_MODEL

pytest.importorskip("matplotlib")


def write_metrics(run: Path, rows: list[dict], extra: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return run


def fake_run(run: Path, scale: float = 1.0) -> Path:
    rows = []
    for step in range(10, 101, 10):
        rows.append({"step": step, "loss": 1.0, "train_bpd": scale * 8 / step ** 0.5, "elapsed_s": step * 0.6})
        if step % 50 == 0:
            rows.append({"step": step, "eval_bpd": scale * 9 / step ** 0.5, "eval_images": 200, "eval_split": "test"})
    return write_metrics(run, rows)


def test_curves_read_times_of_resumed_runs_end_to_end(tmp_path):
    run = write_metrics(tmp_path / "r", [
        {"step": 1, "train_bpd": 5.0, "elapsed_s": 60.0},
        {"step": 1, "eval_bpd": 6.0, "eval_images": 4, "eval_split": "test"},  # older rows: no time
        {"step": 2, "train_bpd": 4.0, "elapsed_s": 30.0},  # resumed: the clock restarted
        {"step": 2, "eval_bpd": 3.0, "elapsed_s": 45.0, "eval_images": 4, "eval_split": "test"},
    ], extra='{"step": 3, "train_b')  # a row cut off by a crash
    c = read_curves(run)
    assert c.train == [(1, 1.0, 5.0), (2, 1.5, 4.0)]
    assert c.held_out == [(1, 1.0, 6.0), (2, 1.75, 3.0)]
    assert (c.split, c.images) == ("test", 4)


def test_plot_two_runs(tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", scale=0.5)
    summary = plot_runs([a, b], tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 500
    assert [r["best_eval_bpd"] for r in summary["runs"]] == pytest.approx([0.9, 0.45])
    assert summary["runs"][0]["steps"] == 100
    result = CliRunner().invoke(app, ["plot", str(a), str(b), "--out", str(tmp_path / "c.png"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["out"] == str(tmp_path / "c.png")


def test_plot_without_metrics_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    write_metrics(tmp_path / "norows", [{"step": 0, "note": "nothing"}])
    for run, words in ((tmp_path / "empty", "no metrics.jsonl"), (tmp_path / "missing", "no such directory"),
                       (tmp_path / "norows", "no bits/dim")):
        with pytest.raises(RunError, match=words):
            plot_runs([run], tmp_path / "x.png")
        result = CliRunner().invoke(app, ["plot", str(run), "--out", str(tmp_path / "x.png")])
        assert result.exit_code == 1
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()
    # the same usage error (exit 2) as `imagetx sample --out DIR`
    result = CliRunner().invoke(app, ["plot", str(fake_run(tmp_path / "a")), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.output


def test_trainer_refreshes_curves_and_survives_a_failure(tmp_path, monkeypatch):
    sets = [*TINY_MODEL, "train.batch_size=4", "train.max_steps=4", "train.log_every=1", "train.eval_every=2",
            "train.eval_images=4", "train.sample_every=0", "train.checkpoint_every=0"]
    train.run(load_config(sets=[*sets, f"train.out={tmp_path / 'ok'}"]))
    with Image.open(tmp_path / "ok" / "curves.png") as im:
        assert im.format == "PNG"
    rows = [json.loads(line) for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert all("elapsed_s" in r for r in rows if "eval_bpd" in r)

    import imagetx.plot

    def broken(run):
        raise RuntimeError("no display today")

    monkeypatch.setattr(imagetx.plot, "refresh_curves", broken)
    summary = train.run(load_config(sets=[*sets, f"train.out={tmp_path / 'broken'}"]))
    assert summary["status"] == "completed" and summary["step"] == 4
    assert not (tmp_path / "broken" / "curves.png").exists()
