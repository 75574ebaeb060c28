"""`imagetx eval-fid`: the arithmetic against an independent numpy/scipy computation, on a
randomly initialised Inception-v3 of the standard FID architecture; cached reference statistics;
bad weights files as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("pytorch_fid")
pytest.importorskip("scipy")

from imagetx import ImageTransformer
from imagetx.cli import app
from imagetx.errors import RunError
from imagetx.eval_fid import FidConfig, features, frechet_distance, load_inception, run
from imagetx.storage.checkpoint import make_checkpoint, save_checkpoint
from support.configs import tiny


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A state dict of the FID Inception-v3's shape, randomly initialised (pytorch-fid's FID blocks
    change torchvision's forward passes, not its parameter names)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny(attention="local1d", block_length=16, image_size=(8, 8), channels=1, num_classes=0)
    ckpt = make_checkpoint(model=ImageTransformer(cfg), config={"model": cfg.to_dict(), "data": {"name": "builtin"}}, step=1)
    return save_checkpoint(tmp_path_factory.mktemp("fid") / "run", ckpt)


def independent_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID from features, written apart from imagetx.eval_fid: tr((S1 S2)^1/2) as the sum of the square
    roots of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric, so numpy's eigh and scipy's PSD root)."""
    from scipy.linalg import sqrtm

    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = (a - mu1).T @ (a - mu1) / (len(a) - 1)
    s2 = (b - mu2).T @ (b - mu2) / (len(b) - 1)
    r1 = np.real(sqrtm(s1))
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(eig, 0, None))))


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 6)), rng.normal(1.0, 2.0, size=(40, 6))
    fid = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid == pytest.approx(independent_fid(a, b), rel=1e-9)
    # N(0, I) against N(m, 4I) in D dims: |m|^2 + D (1 + 4 - 2 * 2)
    I = np.eye(3)
    assert frechet_distance(np.zeros(3), I, np.ones(3), 4 * I) == pytest.approx(3 + 3 * 1.0)


def test_eval_fid_equals_independent_computation_and_caches(checkpoint, random_weights, tmp_path, capsys):
    from imagetx.eval_fid import reference_images, read_npz
    from imagetx.config import DataConfig
    from imagetx.sample import SampleConfig, run as sample

    # the samples are drawn 5 at a time here and 16 at a time by `sample` below: the same images
    req = dict(checkpoint=checkpoint, inception_weights=random_weights, num=12, limit=16, dims=64,
               batch_size=8, sample_batch_size=5, device="cpu", cache_dir=tmp_path / "cache", progress=False)
    first = run(FidConfig(**req))
    assert "not the standard FID Inception weights" in capsys.readouterr().err
    assert (first["samples"], first["reference_images"], first["cached"]) == (12, 16, False)
    second = run(FidConfig(**req))
    assert second["cached"] and second["fid"] == first["fid"]
    assert len(list((tmp_path / "cache").iterdir())) == 1

    extractor = load_inception(random_weights, "cpu", dims=64)
    sample(SampleConfig(checkpoint=checkpoint, num=12, out=None, npz=tmp_path / "s.npz", device="cpu", progress=False))
    refs, _ = reference_images(tiny(attention="local1d", block_length=16, image_size=(8, 8), channels=1, num_classes=0),
                               DataConfig(name="builtin"), "test", 16)
    expected = independent_fid(features(extractor, read_npz(tmp_path / "s.npz")), features(extractor, refs))
    # fewer images than dimensions: the covariances are singular, where scipy's sqrtm of their
    # product (what pytorch-fid and imagetx use) is accurate to about 1e-5 relative
    assert first["fid"] == pytest.approx(expected, rel=1e-4)

    result = CliRunner().invoke(app, ["eval-fid", str(checkpoint), "--inception-weights", str(random_weights),
                                      "--npz", str(tmp_path / "s.npz"), "--limit", "16", "--dims", "64", "--json",
                                      "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["cached"] and out["fid"] == pytest.approx(first["fid"], rel=1e-9)


def test_standard_features_are_2048_wide(random_weights):
    extractor = load_inception(random_weights, "cpu")
    feats = features(extractor, torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_bad_weights_files_are_one_line(checkpoint, tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a weights file")
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    code = tmp_path / "code.pth"
    torch.save({"fc.weight": torch.zeros(2), "x": RunsCode()}, code)
    for path, words in ((tmp_path / "missing.pth", "no such file"), (bad, "not a weights file at all"),
                        (code, "carries Python objects or code"),
                        (other, "not the FID Inception-v3 weights")):
        with pytest.raises(RunError, match=words):
            load_inception(path)
        result = runner.invoke(app, ["eval-fid", str(checkpoint), "--inception-weights", str(path), "--device", "cpu"])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert "pt_inception-2015-12-05-6726825d.pth" in result.output and "Traceback" not in result.output
        assert "weights_only" not in result.output  # never the advice that lowers torch's guard
    result = runner.invoke(app, ["eval-fid", str(checkpoint), "--inception-weights", str(bad), "--dims", "100"])
    assert result.exit_code == 2 and "--dims must be one of 64, 192, 768, 2048" in result.output
