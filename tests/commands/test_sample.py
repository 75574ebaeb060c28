"""`imagetx sample`: outputs, labels, priming, and clean failures that leave nothing behind."""

import numpy as np
import pytest
import torch
from PIL import Image

from imagetx.data import area_downsample
from imagetx.errors import CheckpointError, ConfigError
from imagetx.model import native
from imagetx.sample import SampleConfig, run
from imagetx.storage.images import ImageFileError

from support.checkpoints import write_generator as write_checkpoint


def test_sample_writes_grid_individual_pngs_and_npz(tmp_path):
    path, model = write_checkpoint(tmp_path, attention="local1d", block_length=4)
    out = run(SampleConfig(path, num=5, batch_size=2, seed=3, out=tmp_path / "grid.png",
                            individual=tmp_path / "each", npz=tmp_path / "s.npz", progress=False))
    assert out["images"] == 5 and len(out["written"]) == 1 + 5 + 1
    fused = out["precision"] == "bf16" and native.enabled() and native.library() is not None
    assert out["decoder"] == ("fused" if fused else "torch")  # bf16 on a CPU with AVX512-BF16: the C step
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (5, 5, 3, 3) and arr.dtype == np.uint8
    first = np.asarray(Image.open(tmp_path / "each" / "sample-0.png"))
    assert np.array_equal(first, arr[0])
    assert Image.open(tmp_path / "grid.png").size[0] > 3
    # the same seed gives the same images; another seed, others
    run(SampleConfig(path, num=5, batch_size=2, seed=3, out=None, npz=tmp_path / "t.npz", progress=False))
    assert np.array_equal(np.load(tmp_path / "t.npz")["arr_0"], arr)
    run(SampleConfig(path, num=5, batch_size=2, seed=4, out=None, npz=tmp_path / "u.npz", progress=False))
    assert not np.array_equal(np.load(tmp_path / "u.npz")["arr_0"], arr)


def test_balanced_labels_and_label_range(tmp_path):
    path, _ = write_checkpoint(tmp_path, attention="full", num_classes=3)
    out = run(SampleConfig(path, num=4, out=tmp_path / "g.png", progress=False))
    assert out["labels"] == [0, 1, 2, 0]
    out = run(SampleConfig(path, num=2, label=2, out=tmp_path / "g.png", progress=False))
    assert out["labels"] == [2, 2]
    with pytest.raises(ConfigError, match=r"\[0, 2\]"):
        run(SampleConfig(path, num=2, label=3, out=tmp_path / "h.png", progress=False))
    assert not (tmp_path / "h.png").exists()


def test_prime_keeps_top_rows_and_converts_mode(tmp_path):
    path, _ = write_checkpoint(tmp_path, attention="local2d", query_shape=(2, 3), memory_flange=(1, 3))
    rgba = np.random.default_rng(0).integers(0, 256, (10, 6, 4), dtype=np.uint8)  # 2x the model's size
    Image.fromarray(rgba, "RGBA").save(tmp_path / "prime.png")
    run(SampleConfig(path, num=3, prime=tmp_path / "prime.png", prime_rows=2, out=None,
                      npz=tmp_path / "p.npz", progress=False))
    arr = np.load(tmp_path / "p.npz")["arr_0"]
    # transparency is composited onto white (not dropped, which would show the hidden colours)
    white = Image.new("RGBA", (6, 10), (255, 255, 255, 255))
    rgb = torch.from_numpy(np.asarray(Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB")).copy())
    expected = area_downsample(rgb[None], (5, 3))[0].numpy()  # 10x6 -> 5x3: plain 2x2 averages
    assert np.array_equal(arr[:, :2], np.broadcast_to(expected[:2], (3, 2, 3, 3)))


def test_bad_requests_fail_before_writing_anything(tmp_path):
    path, _ = write_checkpoint(tmp_path, attention="local1d", block_length=4)
    with pytest.raises(ConfigError, match="temperature"):
        run(SampleConfig(path, temperature=-1, out=tmp_path / "a.png", progress=False))
    with pytest.raises(ConfigError, match="does not exist"):
        run(SampleConfig(path, out=tmp_path / "missing" / "a.png", progress=False))
    with pytest.raises(ConfigError, match="unconditional"):
        run(SampleConfig(path, label=1, out=tmp_path / "a.png", progress=False))
    with pytest.raises(CheckpointError):
        run(SampleConfig(tmp_path / "nope.pt", out=tmp_path / "a.png", progress=False))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageFileError, match="broken.png"):
        run(SampleConfig(path, prime=tmp_path / "broken.png", out=tmp_path / "a.png", progress=False))
    with pytest.raises(ConfigError, match="prime-rows"):
        Image.fromarray(np.zeros((5, 3, 3), np.uint8)).save(tmp_path / "ok.png")
        run(SampleConfig(path, prime=tmp_path / "ok.png", prime_rows=5, out=tmp_path / "a.png", progress=False))
    assert not (tmp_path / "a.png").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
