"""Where imagetx keeps files between runs: one cache root, shared by the decoded-data cache
(imagetx.data.cache) and the compiled decoding step (imagetx.model.native); and the one file hash
(exported weights, the FID Inception weights)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

OFF = "off"  # data.cache_dir = "off": no cache


def cache_root(setting: str | None) -> Path | None:
    """The cache folder `data.cache_dir` names: a path, "off" (None: no cache), or None for the
    default: $IMAGETX_CACHE_DIR, else $XDG_CACHE_HOME/imagetx, else ~/.cache/imagetx."""
    if setting == OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    if os.environ.get("IMAGETX_CACHE_DIR"):
        return Path(os.environ["IMAGETX_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "imagetx"


def cache_dir_problems(setting, key: str = "data.cache_dir") -> list[str]:
    """The one check of a cache_dir setting: None (default), "off" or a non-empty path."""
    if setting is None or (isinstance(setting, str) and setting.strip()):
        return []
    return [f'{key} must name a folder or be "{OFF}"; got {setting!r}']


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()
