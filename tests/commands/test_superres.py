"""`imagetx superres`: file and data set inputs, outputs, metrics checked against direct
computations, and bad inputs that fail cleanly (or are skipped, in a directory)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from imagetx.data.transforms import area_downsample
from imagetx.errors import ConfigError, RunError
from imagetx.superres import LowRes, SuperResConfig, run, upscale
from imagetx.training.metrics import PSNR_CAP, compute_metrics, consistency, psnr

from support.checkpoints import rgb
from support.checkpoints import write_superres as write_checkpoint


def png(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return path


def read_png(path):
    return torch.from_numpy(np.asarray(Image.open(path)).copy())


def test_directory_processes_good_images_and_lists_failures(tmp_path, capsys):
    path, _ = write_checkpoint(tmp_path)
    d = tmp_path / "in"
    d.mkdir()
    png(d / "a.png", rgb(2, 2))
    png(d / "a.bmp", rgb(2, 2, seed=3))  # the same stem: both names get their suffix
    png(d / "b.png", rgb(6, 4, seed=1))  # another size: centre-cropped to 4x4, area-resized to 2x2
    png(d / "c.png", rgb(2, 2, seed=2)[..., 0], "L")  # grayscale for an RGB model
    (d / "corrupt.png").write_bytes((d / "a.png").read_bytes()[:30])  # truncated
    png(d / "small.png", rgb(1, 3))  # smaller than the 2x2 source size
    out = tmp_path / "out"
    summary = run(SuperResConfig(path, inputs=d, samples=2, seed=1, out=out, progress=False))

    assert summary["inputs"] == ["a-bmp", "a-png", "b", "c"] and summary["samples_per_input"] == 2
    assert summary["temperature"] == 0.9 and summary["metrics"] is None
    assert {f["file"] for f in summary["failures"]} == {str(d / "corrupt.png"), str(d / "small.png")}
    assert all(f["error"] and not f["error"].startswith(str(d)) for f in summary["failures"])
    names = sorted(p.name for p in out.iterdir())
    stems = ("a-bmp", "a-png", "b", "c")
    assert names == sorted(["comparison.png"] + [f"{n}-sample-{k}.png" for n in stems for k in (0, 1)])
    assert sorted(str(out / n) for n in names) == sorted(summary["written"])
    assert read_png(out / "a-png-sample-1.png").shape == (4, 4, 3)
    # 4 rows of (nearest, bicubic, 2 samples), no ground truth; 4x4 images enlarged 16x, padding 2
    assert Image.open(out / "comparison.png").size == (4 * 66 + 2, 4 * 66 + 2)
    err = capsys.readouterr().err
    assert "b.png: 6x4 centre-cropped and area-resized" in err
    assert "c.png: converted from L to RGB" in err
    assert "warning: skipping " in err and "small.png" in err and "smaller than" in err and "corrupt.png" in err

    # the same seed gives the same samples; another seed, others
    for seed, same in ((1, True), (2, False)):
        run(SuperResConfig(path, inputs=d, samples=2, seed=seed, out=tmp_path / f"o{seed}", progress=False))
        again = [(tmp_path / f"o{seed}" / n).read_bytes() for n in names]
        assert (again == [(out / n).read_bytes() for n in names]) == same


def test_one_file_and_class_conditional_models(tmp_path):
    path, _ = write_checkpoint(tmp_path, num_classes=2)
    x = png(tmp_path / "x.png", rgb(2, 2))
    with pytest.raises(ConfigError, match="class-conditional: give --label"):
        run(SuperResConfig(path, inputs=x, out=tmp_path / "out", progress=False))
    summary = run(SuperResConfig(path, inputs=x, label=1, samples=3, out=tmp_path / "out", progress=False))
    assert summary["inputs"] == ["x"] and summary["failures"] == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "comparison.png", "x-sample-0.png", "x-sample-1.png", "x-sample-2.png"]


def test_bad_inputs_fail_before_writing(tmp_path):
    path, _ = write_checkpoint(tmp_path)
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ConfigError, match="no image files"):
        run(SuperResConfig(path, inputs=empty, out=out, progress=False))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(RunError, match="bad.png: not a readable image"):
        run(SuperResConfig(path, inputs=bad, out=out, progress=False))
    good = png(tmp_path / "good.png", rgb(2, 2))
    with pytest.raises(ConfigError, match="temperature must be"):
        run(SuperResConfig(path, inputs=good, temperature=-0.5, out=out, progress=False))
    with pytest.raises(ConfigError, match="no such file"):
        run(SuperResConfig(path, inputs=tmp_path / "missing.png", out=out, progress=False))
    with pytest.raises(ConfigError, match="exactly one"):
        run(SuperResConfig(path, out=out, progress=False))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        run(SuperResConfig(path, inputs=good, out=tmp_path / "file", progress=False))
    unconditional, _ = write_checkpoint(tmp_path / "u", source_size=None, encoder_layers=0)
    with pytest.raises(ConfigError, match="this checkpoint is not a super-resolution model"):
        run(SuperResConfig(unconditional, inputs=good, out=out, progress=False))
    assert not out.exists()


def test_metrics_are_the_direct_computations(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (4, 4, 3), generator=g, dtype=torch.uint8)
    assert psnr(a, a).item() == PSNR_CAP
    b = a.clone()
    b[0, 0, 0] = (int(a[0, 0, 0]) + 48) % 256
    mse = (int(b[0, 0, 0]) - int(a[0, 0, 0])) ** 2 / 48
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(255**2 / mse))
    # the ground truth explains its own area-downsampled source exactly; the truth itself scores the cap
    _, model = write_checkpoint(tmp_path)
    targets = torch.randint(0, 256, (3, 4, 4, 3), generator=g, dtype=torch.uint8)
    sources = area_downsample(targets, (2, 2))
    inputs = [LowRes(f"test-{i:05d}", sources[i], targets[i]) for i in range(3)]
    m = compute_metrics(model, inputs, targets[:, None], upscale(sources, (4, 4), "bicubic"))
    assert m["mean"]["consistency"] == 0.0 and m["mean"]["psnr"] == PSNR_CAP
    assert consistency(targets[:, None], sources.flip(1)).mean() > 0


def test_dataset_inputs_report_matches_direct_computations(tmp_path, monkeypatch):
    data = {"name": "fake", "task": "superres", "celeba_protocol": True}
    path, model = write_checkpoint(tmp_path, data=data)
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 256, (3, 4, 4, 3), generator=g, dtype=torch.uint8)
    sources = area_downsample(targets, (2, 2))
    seen = {}

    def fake_dataset_for(cfg, data, split, download=None):
        seen.update(name=data.name, split=split, celeba=data.celeba_protocol)
        return [(targets[i], sources[i], -1) for i in range(len(targets))]

    monkeypatch.setattr("imagetx.data.batches.dataset_for", fake_dataset_for)
    out = tmp_path / "out"
    summary = run(SuperResConfig(path, dataset="fake", num=2, samples=2, report=True, out=out, progress=False))
    assert seen == {"name": "fake", "split": "test", "celeba": True}  # the checkpoint's protocol
    assert summary["inputs"] == ["test-00000", "test-00001"]
    # a fifth column: the ground truth
    assert Image.open(out / "comparison.png").size == (5 * 66 + 2, 2 * 66 + 2)

    m = summary["metrics"]
    with torch.no_grad():
        nll = model.nll(targets[:2], source=sources[:2])
    bpd = (nll / (4 * 4 * 3 * math.log(2))).tolist()
    samples = torch.stack([torch.stack([read_png(out / f"test-0000{i}-sample-{k}.png") for k in range(2)])
                           for i in range(2)])  # (2, 2, 4, 4, 3)
    bicubic = [np.array(Image.fromarray(sources[i].numpy()).resize((4, 4), Image.Resampling.BICUBIC))
               for i in range(2)]
    for i, row in enumerate(m["per_input"]):
        assert row["bpd"] == pytest.approx(bpd[i], rel=1e-5)
        small = area_downsample(samples[i], (2, 2)).double()
        assert row["consistency"] == pytest.approx((small - sources[i].double()).abs().mean().item())
        mse = ((samples[i].double() - targets[i].double()) ** 2).flatten(1).mean(1)
        each = (10 * torch.log10(255**2 / mse)).tolist()
        assert row["psnr_samples"] == pytest.approx(each) and row["psnr"] == pytest.approx(sum(each) / 2)
        mse_b = ((torch.from_numpy(bicubic[i]).double() - targets[i].double()) ** 2).mean().item()
        assert row["psnr_bicubic"] == pytest.approx(10 * math.log10(255**2 / mse_b))
    assert m["mean"]["bpd"] == pytest.approx(sum(bpd) / 2, rel=1e-5)
    assert m["mean"]["consistency"] == pytest.approx(sum(r["consistency"] for r in m["per_input"]) / 2)

    # file inputs: no ground truth, so only the consistency error
    png(tmp_path / "x.png", rgb(2, 2))
    summary = run(SuperResConfig(path, inputs=tmp_path / "x.png", report=True, out=out, progress=False))
    row = summary["metrics"]["per_input"][0]
    assert row["bpd"] is None and row["psnr"] is None and row["psnr_bicubic"] is None
    assert 0 <= row["consistency"] <= 255


def test_builtin_dataset_end_to_end(tmp_path):
    path, _ = write_checkpoint(tmp_path, data={"name": "builtin", "task": "superres", "builtin_size": 8},
                               image_size=(8, 8), source_size=(2, 2))
    summary = run(SuperResConfig(path, dataset="builtin", num=2, report=True, out=tmp_path / "out", progress=False))
    assert summary["inputs"] == ["test-00000", "test-00001"]
    assert all(r["bpd"] > 0 and r["psnr_bicubic"] > 0 for r in summary["metrics"]["per_input"])


def test_an_unknown_data_key_in_the_checkpoint_is_an_error_not_dropped(tmp_path):
    from imagetx.errors import CheckpointError

    path, _ = write_checkpoint(tmp_path, data={"name": "builtin", "task": "superres", "shuffle_buffer": 64})
    with pytest.raises(CheckpointError, match=r"unknown key data\.shuffle_buffer"):
        run(SuperResConfig(path, dataset="builtin", num=1, out=tmp_path / "out", progress=False))


def test_consistent_samples_round_trip_and_the_report_scores_both_modes(tmp_path):
    from typer.testing import CliRunner

    from imagetx.cli import app
    from imagetx.data.batches import dataset_for
    from imagetx.config import DataConfig

    data = {"name": "builtin", "task": "superres", "builtin_size": 8}
    path, model = write_checkpoint(tmp_path, data=data, image_size=(8, 8), source_size=(2, 2))
    sources = torch.stack([torch.as_tensor(dataset_for(model.config, DataConfig(**data), "test")[i][1])
                           for i in range(3)])

    def superres(out, *flags):
        result = CliRunner().invoke(app, ["superres", str(path), "--dataset", "builtin", "-n", "3", "--samples", "2",
                                          "--json", "--out", str(out), *flags])
        assert result.exit_code == 0, result.output
        samples = torch.stack([torch.stack([read_png(out / f"test-0000{i}-sample-{k}.png") for k in range(2)])
                               for i in range(3)])  # (3, 2, 8, 8, 3)
        return json.loads(result.stdout.strip().splitlines()[-1]), samples, Image.open(out / "comparison.png").size[0]

    summary, samples, width = superres(tmp_path / "both", "--consistent", "--report")
    assert summary["consistent"] is True
    for k in range(2):
        assert torch.equal(area_downsample(samples[:, k], (2, 2)), sources)
    assert summary["metrics"]["mean"]["consistency"] == 0.0
    assert summary["metrics_unrestricted"]["mean"]["consistency"] > 1  # a random model, unrestricted
    free, free_samples, free_width = superres(tmp_path / "free", "--report")
    assert free["metrics_unrestricted"] is None
    assert free["metrics"]["mean"] == summary["metrics_unrestricted"]["mean"]  # same seed, same draws
    # the grid: nearest, bicubic, 2 unrestricted, 2 consistent, the ground truth (2 columns fewer without)
    cell = (free_width - 2) // 5
    assert width == 7 * cell + 2


def test_consistent_refuses_models_whose_input_is_not_their_downsampled_target(tmp_path):
    x = png(tmp_path / "x.png", rgb(2, 2))
    celeba, _ = write_checkpoint(tmp_path / "c", data={"name": "celeba", "task": "superres", "celeba_protocol": True})
    with pytest.raises(ConfigError, match="CelebA protocol"):
        run(SuperResConfig(celeba, inputs=x, consistent=True, out=tmp_path / "out", progress=False))
    odd, _ = write_checkpoint(tmp_path / "o", image_size=(5, 4), source_size=(2, 2))
    with pytest.raises(ConfigError, match="multiple of the input size"):
        run(SuperResConfig(odd, inputs=x, consistent=True, out=tmp_path / "out", progress=False))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("range_input", [False, True])
def test_a_consistent_model_samples_consistently_without_the_flag(tmp_path, range_input):
    path, _ = write_checkpoint(tmp_path, data={"name": "builtin", "task": "superres", "builtin_size": 8},
                               image_size=(8, 8), source_size=(2, 2), consistent=True, range_input=range_input)
    for flags in ({}, {"consistent": True}):
        summary = run(SuperResConfig(path, dataset="builtin", num=2, samples=2, report=True, out=tmp_path / "out",
                                     progress=False, **flags))
        assert summary["consistent"] is True and summary["metrics_unrestricted"] is None  # one mode: its own
        assert summary["metrics"]["mean"]["consistency"] == 0.0
