"""The decoded-data cache: each (data set, split, image size, channels) decoded once into one uint8
array file that every process opens memory-mapped.

    CACHE/cifar10-train-32x32x3-1f0c9e2a7b3d/
        images.npy      uint8 (N, H, W, C), exactly what the reader returns
        labels.npy      int64 (N,) (absent for unlabelled data)
        manifest.json   the request, the source files (size, mtime), the array's shape, checksums,
                        and what the data set class needs (description, classes); written last

Under torchrun the local main process converts while the others wait (imagetx.train), and a
lock file beside the entry keeps any other process, another run's included, from converting the
same entry at once: it waits, then reuses what the first one wrote. Each file is written to a
temporary name and renamed into place, the manifest last, so a half-written entry never has a
manifest that matches it. Every process then reads the arrays with np.load(mmap_mode="r"): the
operating system's page cache holds one copy for the whole node, however many processes and
DataLoader workers read it.

An entry whose sources changed (size or modification time of a file, or the files of a folder)
or whose files do not match their manifest (shape, checksum) is rebuilt, with a note.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from imagetx import console
from imagetx.data.dataset import ImageDataset, StreamedImageDataset
from imagetx.errors import DatasetError
from imagetx.system.atomic import atomic_path, atomic_write
from imagetx.system.lock import FileLock
from imagetx.system.paths import OFF

FORMAT = 1  # bump when the files or what a reader returns change: old entries are then rebuilt
CHUNK = 256  # images decoded per DataLoader batch while converting
MAX_DECODERS = 8  # worker processes decoding image files while converting


# ---- what an entry is made from -------------------------------------------------------------
def source_state(paths: Sequence[Path]) -> list[dict]:
    """Size and modification time of each source: a file as itself, a folder as its file count,
    total size and newest modification time (a file added, removed or rewritten changes it)."""
    state = []
    for path in paths:
        path = Path(path)
        st = path.stat()
        if not path.is_dir():
            state.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
            continue
        count, size, newest = 0, 0, st.st_mtime_ns
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            newest = max(newest, os.stat(dirpath).st_mtime_ns)
            for name in filenames:
                s = os.stat(os.path.join(dirpath, name))
                count, size, newest = count + 1, size + s.st_size, max(newest, s.st_mtime_ns)
        state.append({"path": str(path.resolve()), "files": count, "size": size, "mtime_ns": newest})
    return state


def checksum(path: Path, samples: int = 64, span: int = 1 << 16) -> str:
    """BLAKE2b of a file's size and of `samples` evenly spaced `span`-byte slices (all of a file
    up to samples * span bytes): catches a truncated, replaced or overwritten file in a few MB of
    reading, whatever the file's size."""
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= samples * span:
            h.update(f.read())
        else:
            for i in range(samples):
                f.seek(i * (size - span) // (samples - 1))
                h.update(f.read(span))
    return h.hexdigest()


def entry_name(name: str, split: str, data_dir: Path, image_size, channels) -> str:
    """The folder of one request: readable, plus a digest of the data directory and FORMAT."""
    size = f"{image_size[0]}x{image_size[1]}" if image_size is not None else "native"
    chans = f"x{channels}" if channels is not None else ""
    digest = hashlib.blake2b(f"{FORMAT}:{data_dir.resolve()}".encode(), digest_size=6).hexdigest()
    return f"{name}-{split}-{size}{chans}-{digest}"


# ---- the data set read from an entry --------------------------------------------------------
class CachedDataset(ImageDataset):
    """A data set read from a cache entry, memory-mapped; items as ImageDataset's. Pickled for a
    DataLoader worker it carries the path, not the array: the worker maps the same file."""

    def __init__(self, entry: Path, manifest: dict):
        meta = manifest["dataset"]
        n, h, w, c = manifest["shape"]
        labels = None
        if manifest["labels"]:
            labels = torch.from_numpy(np.load(entry / "labels.npy", allow_pickle=False))
        super().__init__(None, labels, image_size=(h, w), channels=c, **meta)
        self.entry, self.n = entry, n
        self._array = self._map()

    def _map(self) -> np.ndarray:
        return np.load(self.entry / "images.npy", mmap_mode="r", allow_pickle=False)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self._array[i])), self._label(i)

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return torch.from_numpy(self._array[idx.numpy()]), self._batch_labels(idx)  # a copy: (B, H, W, C)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_array"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._array = self._map()


def cache_entry(dataset) -> Path | None:
    """The cache entry a data set (or the one a wrapper such as SuperResDataset holds) is mapped
    from; None when it is not read from the cache."""
    while not isinstance(dataset, CachedDataset) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset.entry if isinstance(dataset, CachedDataset) else None


def _read_manifest(entry: Path, sources: list[dict], request: dict) -> tuple[dict | None, str]:
    """-> (manifest, "") for an entry that can be used, else (None, why not: "" when absent)."""
    path = entry / "manifest.json"
    if not path.exists():
        return None, ""
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("request") != request:
            return None, "it was written by another imagetx version"
        if manifest["sources"] != sources:
            changed = next(
                (s["path"] for s, m in zip(sources, manifest["sources"]) if s != m), "the list of source files"
            )
            return None, f"its source data changed ({changed})"
        for name, digest in manifest["checksums"].items():  # first: the digest covers the size
            if checksum(entry / name) != digest:
                return None, f"{name} does not match its checksum (truncated, overwritten or replaced)"
        images = np.load(entry / "images.npy", mmap_mode="r", allow_pickle=False)
        if images.dtype != np.uint8 or list(images.shape) != manifest["shape"]:
            return None, f"images.npy holds {images.dtype} {list(images.shape)}, not what its manifest says"
        del images
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"it cannot be read ({type(exc).__name__}: {exc})"
    return manifest, ""


# ---- writing an entry -----------------------------------------------------------------------
def _chunks(dataset: ImageDataset, workers: int) -> Iterator[torch.Tensor]:
    """uint8 (b, H, W, C) in order: the parts of a streamed data set, slices of an in-memory
    one, or batches decoded by `workers` DataLoader processes from a file-backed one."""
    if isinstance(dataset, StreamedImageDataset):
        yield from dataset.chunks()
    elif dataset.images is not None:
        for start in range(0, len(dataset), CHUNK * 16):
            yield dataset.images[start : start + CHUNK * 16]
    else:
        for images, _ in DataLoader(dataset, batch_size=CHUNK, shuffle=False, num_workers=workers):
            yield images


def _decoders(n: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(MAX_DECODERS, cpus) if n >= 4 * CHUNK else 0


def _write(entry: Path, dataset: ImageDataset, sources: list[dict], request: dict, workers: int | None) -> None:
    n = len(dataset)
    if n == 0:
        raise DatasetError(f"{dataset.description} has no images: give a data set with images in its {dataset.split} split")
    h, w = dataset.image_size
    shape = (n, h, w, dataset.channels)
    need = int(np.prod(shape)) + 8 * n + (1 << 20)
    free = shutil.disk_usage(entry).free
    if free < need:
        raise OSError(errno.ENOSPC, f"{need / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free")
    (entry / "manifest.json").unlink(missing_ok=True)  # from here on the old entry is never used
    console.note(f"decoding the data once into the cache {entry} ({need / 2**20:.0f} MB); every process reads it from there")
    bar = console.progress(n, f"decoding {dataset.description} into the data cache", "images")
    try:
        with atomic_path(entry / "images.npy") as tmp:
            images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            with open(tmp, "r+b") as f:  # reserve the space now: a full disk under a mapping is SIGBUS
                try:
                    os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
            start = 0
            for chunk in _chunks(dataset, _decoders(n) if workers is None else workers):
                images[start : start + len(chunk)] = chunk.numpy()
                start += len(chunk)
                bar.update(len(chunk))
            images.flush()
            del images
    finally:
        bar.close()
    checksums = {"images.npy": checksum(entry / "images.npy")}
    if dataset.labels is not None:
        labels = dataset.labels.numpy().astype(np.int64)
        atomic_write(entry / "labels.npy", lambda f: np.save(f, labels, allow_pickle=False))
        checksums["labels.npy"] = checksum(entry / "labels.npy")
    manifest = {
        "format": FORMAT,
        "request": request,
        "sources": sources,
        "shape": list(shape),
        "labels": dataset.labels is not None,
        "checksums": checksums,
        "dataset": {
            "name": dataset.name,
            "split": dataset.split,
            "description": dataset.description,
            "num_classes": dataset.num_classes,
            "class_names": dataset.class_names,
        },
    }
    atomic_write(entry / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())


def cached(
    root: Path,
    request: dict,
    data_dir: Path,
    sources: Sequence[Path],
    load,
    workers: int | None = None,
) -> ImageDataset:
    """The data set `load()` returns, read from its cache entry under root; built first (under
    the entry's lock, with a progress bar) when absent, stale or corrupt.

    request: {"name", "split", "image_size" (H, W) or None, "channels" or None}; sources: the
    files and folders it is decoded from; workers: decoding processes (None: up to 8 CPUs).
    Raises DatasetError when the cache folder cannot be written (unwritable, full)."""
    request = {**request, "image_size": list(request["image_size"]) if request["image_size"] else None}
    entry = root / entry_name(request["name"], request["split"], data_dir, request["image_size"], request["channels"])
    state = source_state(sources)
    manifest, _ = _read_manifest(entry, state, request)
    if manifest is not None:
        return CachedDataset(entry, manifest)
    try:
        entry.mkdir(parents=True, exist_ok=True)
        lock = FileLock(entry.with_name(entry.name + ".lock"))
        with lock.acquire(wait=lambda holder: console.note(f"waiting for {holder}, which is writing the data cache {entry}")):
            manifest, why = _read_manifest(entry, state, request)  # the holder may have written it
            if manifest is None:
                if why:
                    console.note(f"rebuilding the data cache {entry}: {why}")
                _write(entry, load(), state, request, workers)
                manifest, why = _read_manifest(entry, state, request)
                if manifest is None:  # only a concurrent change of the sources gets here
                    raise DatasetError(f"the data cache {entry} did not verify after writing it ({why}); try again")
    except OSError as exc:
        raise DatasetError(
            f"cannot write the data cache in {root}: {exc.strerror or exc}; set data.cache_dir to a writable "
            f'folder with room for the decoded data (or "{OFF}" to decode in every process)'
        ) from None
    return CachedDataset(entry, manifest)
