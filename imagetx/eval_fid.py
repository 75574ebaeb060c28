"""`imagetx eval-fid`: Frechet Inception Distance between samples and a data set split.

Features are the 2048-d pool features of pytorch-fid's Inception-v3 (the port of the TensorFlow
graph every published FID uses), built from a weights file the user supplies: nothing is ever
downloaded. Images are uint8 (N, H, W, C); grayscale is repeated to three channels and pytorch-fid
resizes to 299x299 (bilinear) and scales to [-1, 1], as it does for its own command.

    FID = |mu_s - mu_r|^2 + tr(S_s + S_r - 2 (S_s S_r)^(1/2))

over the sample (s) and reference (r) feature means and covariances (unbiased, N - 1). The
reference statistics of a split are cached in `cache_dir` under a name made of the data set, its
split, image size and count, and the weights file's hash: the second run on a split only
extracts the samples' features.

Only the standard file gives numbers comparable with published FIDs; another file (a random one in
the tests) works and is named in a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from imagetx import console
from imagetx.system.atomic import atomic_write
from imagetx.checks import count_problems, seed_problems, temperature_problems
from imagetx.system.distributed import device_problems
from imagetx.system.paths import file_sha256
from imagetx.errors import ConfigError, RunError, raise_problems
from imagetx.model.decoding import DEFAULT_WINDOW

STANDARD_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{STANDARD_WEIGHTS}"
STANDARD_SHA256_PREFIX = "6726825d"  # torch.hub names files by the first 8 hex digits of their SHA-256
FEATURES = 2048  # the pool features every published FID uses
DIMS = (64, 192, 768, 2048)  # pytorch-fid's blocks: after the first and second max pool, pre-aux, pool


def _where_from() -> str:
    return (f"the standard file is {STANDARD_WEIGHTS} (pytorch-fid's Inception-v3, SHA-256 beginning "
            f"{STANDARD_SHA256_PREFIX}), from {STANDARD_URL}; download it on a machine with a network and "
            "pass its path")


# ---- the feature extractor -------------------------------------------------------------------------
def load_inception(weights: str | os.PathLike, device: torch.device | str = "cpu", dims: int = FEATURES) -> torch.nn.Module:
    """pytorch-fid's FID Inception-v3 with the weights in `weights`, in eval mode, returning the
    `dims`-d features of one of its blocks (2048: the pool features of standard FID). Raises RunError when pytorch-fid is missing or the file is missing, unreadable or
    not an Inception-v3 state dict."""
    try:
        from pytorch_fid import inception
    except ImportError:
        raise RunError("eval-fid needs the pytorch-fid package: pip install 'imagetx[fid]'") from None
    path = Path(weights)
    if not path.is_file():
        raise RunError(f"--inception-weights {path}: no such file; {_where_from()}")
    from imagetx.storage.checkpoint import read_torch_file
    from imagetx.errors import CheckpointError

    try:  # the one reader of torch files: says what a bad file is, never how to lower the guard
        state = read_torch_file(path, "weights file")
    except CheckpointError as exc:
        raise RunError(f"--inception-weights {exc}; {_where_from()}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"--inception-weights {path}: not a state dict of tensors; {_where_from()}")
    # pytorch-fid fetches its weights inside the constructor: hand it the user's instead
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        try:
            model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
        except (RuntimeError, KeyError) as exc:  # missing or unexpected keys, wrong shapes
            detail = " ".join(str(exc).split())[:160]
            raise RunError(f"--inception-weights {path}: not the FID Inception-v3 weights ({detail}); {_where_from()}") from None
    return model.to(device).eval()


@torch.inference_mode()
def features(extractor: torch.nn.Module, images: torch.Tensor, batch_size: int = 50, progress: bool = False) -> np.ndarray:
    """uint8 (N, H, W, C), C 1 or 3 -> float64 (N, D) features (spatially averaged for the
    blocks before the pool, as pytorch-fid does)."""
    device = next(extractor.parameters()).device
    out = []
    bar = console.progress(len(images), "inception features", "img", enabled=progress)
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device).permute(0, 3, 1, 2).float() / 255  # (B, C, H, W) in [0, 1]
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            f = extractor(x)[0]  # (B, D, h, w)
            if f.shape[2:] != (1, 1):
                f = torch.nn.functional.adaptive_avg_pool2d(f, 1)
            out.append(f.flatten(1).double().cpu())  # (B, D)
            bar.update(len(x))
    finally:
        bar.close()
    return torch.cat(out).numpy()


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D)."""
    if len(feats) < 2:
        raise RunError(f"FID needs at least 2 images on each side, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it
    (scipy's sqrtm, an eps ridge when the product is singular, the real part)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise RunError(f"FID: the covariance product has a large imaginary square root ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---- the command -----------------------------------------------------------------------------------
@dataclass
class FidConfig:
    """What `imagetx eval-fid` compares: samples (drawn from `checkpoint`, or read from `npz`)
    against a split of the data set the model was trained on (or `dataset`)."""

    checkpoint: str | os.PathLike
    inception_weights: str | os.PathLike
    npz: str | os.PathLike | None = None  # uint8 (N, H, W, C) under arr_0, e.g. from `imagetx sample --npz`
    num: int = 1000  # samples to draw when no npz is given
    temperature: float = 1.0
    seed: int = 0
    dataset: str | None = None
    data_dir: str | None = None
    split: str = "test"
    limit: int | None = None  # reference images (None: the whole split)
    batch_size: int = 50  # images per Inception forward pass
    sample_batch_size: int = 64  # images decoded together when drawing the samples (per process)
    dims: int = FEATURES  # 2048 for standard FID; fewer for quick relative checks
    device: str = "auto"
    cache_dir: str | os.PathLike | None = None  # default: $XDG_CACHE_HOME/imagetx/fid or ~/.cache/imagetx/fid
    progress: bool = True
    weights: str = "auto"  # the checkpoint's weights that draw the samples (storage.weights.weights_key)
    decode: str = "auto"  # how the samples are drawn: "sequential", "parallel" or "auto" (the same samples)
    window: int = DEFAULT_WINDOW  # positions per pass of parallel decoding
    compile: bool | None = None  # the static decoding step through torch.compile (None: on a GPU; model/decoding.py)

    def problems(self) -> list[str]:
        from imagetx.model.decoding import compile_problems, decode_problems
        from imagetx.storage.weights import weights_problems

        p = count_problems(self.num, "--num") + count_problems(self.batch_size, "--batch-size") + weights_problems(self.weights)
        p += count_problems(self.sample_batch_size, "--sample-batch-size")
        if self.limit is not None:
            p += count_problems(self.limit, "--limit")
        if self.dims not in DIMS:
            p.append(f"--dims must be one of {', '.join(map(str, DIMS))}; got {self.dims}")
        p += decode_problems(self.decode, self.window) + compile_problems(self.compile)
        return p + temperature_problems(self.temperature) + seed_problems(self.seed) + device_problems(self.device)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagetx" / "fid"


def read_npz(path: Path) -> torch.Tensor:
    """uint8 (N, H, W, C) from arr_0 of an npz (no pickles). Raises RunError."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arr = f["arr_0"] if "arr_0" in f.files else f[f.files[0]]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise RunError(f"--npz {path}: not a readable npz of images ({exc})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise RunError(f"--npz {path}: expected uint8 (N, H, W, C) with C 1 or 3, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.copy())


def reference_images(model_cfg, data, split: str, limit: int | None) -> tuple[torch.Tensor, str]:
    """The first `limit` images of a split as uint8 (N, H, W, C), and the data set's description."""
    from imagetx.data.batches import batches, dataset_for, describe

    ds = dataset_for(model_cfg, data, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    chunks = [list(range(i, min(i + 256, n))) for i in range(0, n, 256)]
    images = torch.cat([b[0] for b in batches(ds, iter(chunks))])
    return images, describe(ds)[0]


def run(req: FidConfig) -> dict | None:
    """FID of req's samples against a data set split -> {"fid", "samples", "reference_images",
    "dataset", "split", "weights", "standard_weights", "reference_cache", "cached"}. Raises
    ConfigError, RunError, CheckpointError, DatasetError. Under torchrun the processes share the
    drawing of the samples (imagetx.sample.draw: the same samples as one process) and the main
    process alone scores them; the others return None."""
    from imagetx.system.distributed import distributed

    raise_problems(req.problems())
    with distributed(req.device) as ctx:
        return _run(req, ctx)


def _run(req: FidConfig, ctx) -> dict | None:
    from imagetx.storage.checkpoint import load_checkpoint, resolve_checkpoint
    from imagetx.storage.weights import model_from_checkpoint
    from imagetx.config import data_config_from_checkpoint

    device = ctx.device
    weights = Path(req.inception_weights)
    extractor = load_inception(weights, device, req.dims)  # first: a bad weights file costs no sampling
    digest = file_sha256(weights)
    standard = digest.startswith(STANDARD_SHA256_PREFIX)
    if not standard and ctx.is_main:
        console.warn(f"{weights} is not the standard FID Inception weights (SHA-256 {digest[:8]}..., expected "
                     f"{STANDARD_SHA256_PREFIX}...): these FIDs are not comparable with published ones")
    path = resolve_checkpoint(req.checkpoint)
    ckpt = load_checkpoint(path)
    cfg = model_from_checkpoint(ckpt, path, weights=req.weights).config
    data = data_config_from_checkpoint(ckpt, path, req.dataset, req.data_dir)

    if req.npz is not None:
        samples = read_npz(Path(req.npz))
    else:
        if cfg.source_size is not None:
            raise ConfigError(["this is a super-resolution model: give its samples with --npz"])
        from imagetx.sample import SampleConfig, draw

        samples, _ = draw(SampleConfig(checkpoint=path, num=req.num, temperature=req.temperature, seed=req.seed,
                                       batch_size=req.sample_batch_size, device=req.device, out=None,
                                       progress=req.progress, weights=req.weights, decode=req.decode,
                                       window=req.window, compile=req.compile), ctx)
    if not ctx.is_main:
        return None

    cache = Path(req.cache_dir) if req.cache_dir is not None else default_cache_dir()
    H, W = cfg.image_size
    key = f"{data.name}-{req.split}-{H}x{W}x{cfg.channels}-{req.limit or 'all'}-{req.dims}-{digest[:16]}"
    if data.data_dir is not None or data.builtin_size is not None:  # another copy or rendering of the data
        key += "-" + hashlib.sha256(f"{data.data_dir}|{data.builtin_size}".encode()).hexdigest()[:8]
    cached_file = cache / f"reference-{key}.npz"
    cached = cached_file.is_file()
    if cached:
        try:
            with np.load(cached_file, allow_pickle=False) as f:
                mu_r, sigma_r = f["mu"], f["sigma"]
                meta = json.loads(str(f["meta"]))
        except (OSError, ValueError, KeyError) as exc:
            console.warn(f"{cached_file}: unreadable ({exc}); computing the reference statistics again")
            cached = False
    if not cached:
        images, description = reference_images(cfg, data, req.split, req.limit)
        mu_r, sigma_r = statistics(features(extractor, images, req.batch_size, req.progress))
        meta = {"dataset": description, "split": req.split, "images": len(images)}
        try:
            import io

            cache.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.savez(buf, mu=mu_r, sigma=sigma_r, meta=np.array(json.dumps(meta)))
            atomic_write(cached_file, buf.getvalue())
        except OSError as exc:  # a read-only home: the result stands, only the cache is lost
            console.warn(f"cannot cache the reference statistics in {cache}: {exc.strerror or exc}")
    mu_s, sigma_s = statistics(features(extractor, samples, req.batch_size, req.progress))
    with warnings.catch_warnings():  # scipy warns on nearly singular products, handled above
        warnings.simplefilter("ignore")
        fid = frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
    return {
        "fid": fid, "samples": int(samples.shape[0]), "reference_images": meta["images"], "dataset": meta["dataset"],
        "split": meta["split"], "dims": req.dims, "checkpoint": str(path), "weights": str(weights), "standard_weights": standard,
        "reference_cache": str(cached_file), "cached": cached,
    }
