"""The decoded-data cache: the same data as the readers, memory-mapped, rebuilt when stale or
corrupt, never used half-written, one converter at a time, and one clear line when it cannot be
written."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from imagetx.data import DatasetError, load_dataset
from imagetx.data import cache as data_cache
from imagetx.data.cache import CachedDataset
from imagetx.system.paths import cache_root
from support.datasets import channel_major, random_images, write_celeba, write_cifar10, write_pngs


def entries(cache_dir):
    return sorted(p for p in cache_dir.iterdir() if p.is_dir())


def same(a, b) -> None:
    """Two data sets give the same items, labels and metadata."""
    assert len(a) == len(b) and a.image_size == b.image_size and a.channels == b.channels
    assert (a.description, a.num_classes, a.class_names, a.name, a.split) == (
        b.description, b.num_classes, b.class_names, b.name, b.split,
    )
    idx = list(range(len(a)))
    xa, la = a.get_batch(idx)
    xb, lb = b.get_batch(idx)
    assert torch.equal(xa, xb) and torch.equal(la, lb)
    assert torch.equal(a[len(a) - 1][0], b[len(b) - 1][0]) and a[0][1] == b[0][1]


def write_imagenet_npz(root, n=6, size=32):
    images = random_images(n, size, size)
    np.savez(root / "val_data.npz", data=channel_major(images), labels=np.arange(1, n + 1))
    return images


@pytest.mark.parametrize(
    "name, split, size, channels",
    [("cifar10", "train", None, None), ("cifar10", "test", (16, 16), 1), ("imagenet32", "test", None, 3),
     ("imagenet32", "train", (12, 20), 1),
     ("imagenet32-png", "train", (16, 16), None), ("celeba", "valid", (8, 8), None), ("folder", "test", (8, 8), 1)],
)
def test_cached_equals_the_reader_and_is_memory_mapped(tmp_path, name, split, size, channels):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    if name == "cifar10":
        write_cifar10(data)
    elif name == "imagenet32":
        write_imagenet_npz(data)  # val_data.npz
        for k in (1, 2, 10):  # the train split in several files, converted file by file
            images = random_images(3, 32, 32)
            np.savez(data / f"train_data_batch_{k}.npz", data=channel_major(images), labels=[k, 1000, 7])
    elif name == "imagenet32-png":
        write_pngs(data / "staging" / "train_32x32", random_images(5, 32, 32))
        with tarfile.open(data / "train_32x32.tar", "w") as tar:
            tar.add(data / "staging" / "train_32x32", arcname="train_32x32")
        name = "imagenet32"
    elif name == "celeba":
        write_celeba(data)
    else:
        for cls in ("a", "b"):
            (data / cls).mkdir()
            for i in range(10):
                Image.fromarray(random_images(1, 12, 10)[0]).save(data / cls / f"{i}.png")
    plain = load_dataset(name, data, split=split, image_size=size, channels=channels)
    cached = load_dataset(name, data, split=split, image_size=size, channels=channels, cache_dir=cache)
    assert isinstance(cached, CachedDataset) and isinstance(cached._array, np.memmap)
    same(cached, plain)
    [entry] = entries(cache)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["shape"] == [len(plain), *plain.image_size, plain.channels]
    assert all("size" in s and "mtime_ns" in s for s in manifest["sources"])
    stamp = (entry / "images.npy").stat().st_mtime_ns
    again = load_dataset(name, data, split=split, image_size=size, channels=channels, cache_dir=cache)
    same(again, plain)
    assert (entry / "images.npy").stat().st_mtime_ns == stamp  # read, not written again


def test_a_dataloader_worker_maps_the_file_instead_of_receiving_the_array(tmp_path):
    write_cifar10(tmp_path / "data", n=64)
    ds = load_dataset("cifar10", tmp_path / "data", cache_dir=tmp_path / "cache")
    blob = pickle.dumps(ds)
    assert len(blob) < ds.n * 32 * 32 * 3 // 10  # the labels and metadata, not the images
    copy = pickle.loads(blob)
    assert isinstance(copy._array, np.memmap)
    same(copy, ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=100, num_workers=1)
    assert torch.equal(torch.cat([x for x, _ in loader]), ds.get_batch(range(len(ds)))[0])


def test_stale_and_corrupt_entries_are_rebuilt_with_a_note(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    write_imagenet_npz(data)
    load_dataset("imagenet32", data, split="test", cache_dir=cache)
    [entry] = entries(cache)

    changed = write_imagenet_npz(data)  # the source is replaced: new size or mtime
    os.utime(data / "val_data.npz", ns=(1, 1))
    capsys.readouterr()
    ds = load_dataset("imagenet32", data, split="test", cache_dir=cache)
    err = capsys.readouterr().err
    assert f"note: rebuilding the data cache {entry}: its source data changed ({data / 'val_data.npz'})" in err
    assert torch.equal(ds.get_batch(range(6))[0], torch.from_numpy(changed))

    for damage, why in [
        (lambda: (entry / "images.npy").write_bytes((entry / "images.npy").read_bytes()[:-7]), "checksum"),
        (lambda: _flip_byte(entry / "images.npy"), "checksum"),
        (lambda: (entry / "manifest.json").write_text("{not json"), "cannot be read"),
        (lambda: (entry / "labels.npy").unlink(), "cannot be read"),
        (lambda: _rewrite_shape(entry), "not what its manifest says"),
    ]:
        damage()
        capsys.readouterr()
        ds = load_dataset("imagenet32", data, split="test", cache_dir=cache)
        err = capsys.readouterr().err
        assert f"note: rebuilding the data cache {entry}" in err and why in err, err
        assert torch.equal(ds.get_batch(range(6))[0], torch.from_numpy(changed))


def test_a_changed_source_is_named_when_rebuilding(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_cifar10(data)
    load_dataset("cifar10", data, cache_dir=cache)
    (data / "cifar-10-batches-py" / "extra").write_text("a new file in the folder")
    capsys.readouterr()
    load_dataset("cifar10", data, cache_dir=cache)
    assert "its source data changed" in capsys.readouterr().err


def _rewrite_shape(entry):
    """images.npy replaced by an array of another shape, its checksum updated to match."""
    np.save(entry / "images.npy", np.zeros((3, 32, 32, 3), np.uint8))
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["checksums"]["images.npy"] = data_cache.checksum(entry / "images.npy")
    (entry / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_half_written_entry_is_never_used(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    images = write_imagenet_npz(data)

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the conversion

    monkeypatch.setattr(data_cache, "_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("imagenet32", data, split="test", cache_dir=cache)
    [entry] = entries(cache)
    assert not (entry / "manifest.json").exists() and not list(entry.glob("*.npy*"))  # temporary removed
    monkeypatch.undo()
    # a process killed mid-write leaves its temporary file (and maybe an images.npy of an
    # earlier try) but no manifest that matches: the entry is written again
    (entry / ".images.npy.tmp-999999").write_bytes(b"\x93NUMPY half")
    np.save(entry / "images.npy", np.zeros((6, 32, 32, 3), np.uint8))
    ds = load_dataset("imagenet32", data, split="test", cache_dir=cache)
    assert torch.equal(ds.get_batch(range(6))[0], torch.from_numpy(images))
    assert not (entry / ".images.npy.tmp-999999").exists()


def test_an_unwritable_or_full_cache_folder_is_one_line(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_imagenet_npz(data)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DatasetError, match=r"^cannot write the data cache in .*file/cache: .*set data.cache_dir"):
        load_dataset("imagenet32", data, split="test", cache_dir=tmp_path / "file" / "cache")
    monkeypatch.setattr(data_cache.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(DatasetError, match=r"cannot write the data cache .*GiB needed, 0.00 GiB free") as info:
        load_dataset("imagenet32", data, split="test", cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache").rglob("manifest.json"))


def test_a_full_cache_folder_stops_train_before_it_starts(tmp_path):
    from support.cli import invoke, one_error_line, sets

    data = tmp_path / "data"
    write_cifar10(data)
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "run"
    result = invoke(
        "train", "--dataset", "cifar10", "--data-dir", data, "--out", out, "--device", "cpu",
        *sets(f"data.cache_dir={tmp_path / 'file' / 'c'}", "train.max_steps=1"),
    )
    one_error_line(result, 1, "error: cannot write the data cache in ")
    assert not (out / "checkpoints").exists()


def test_cache_root_and_config(monkeypatch):
    from pathlib import Path

    from imagetx.config import load_config
    from imagetx.errors import ConfigError

    assert cache_root("off") is None and cache_root("/x/y") == Path("/x/y")
    assert cache_root(None) == Path(os.environ["IMAGETX_CACHE_DIR"])  # tests: a temporary folder (conftest)
    monkeypatch.delenv("IMAGETX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert cache_root(None) == Path("/xdg/imagetx")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert cache_root(None) == Path("/home/u/.cache/imagetx")
    assert load_config(sets=["data.cache_dir=off"]).data.cache_dir == "off"
    with pytest.raises(ConfigError, match=r'data.cache_dir must name a folder or be "off"; got '):
        load_config(sets=['data.cache_dir=""'])


CONVERT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from imagetx import console
    from imagetx.data import cache, load_dataset
    write, note = cache._write, console.note
    waited = Path(sys.argv[3] + ".waited")
    def noting(text, *args, **kwargs):
        if text.startswith("waiting for"):
            waited.touch()
        note(text, *args, **kwargs)
    def slow_write(entry, *args):
        print("converting", flush=True)
        start = time.time()  # hold the lock until the other process waits on it, however late it comes
        while not waited.exists() and time.time() - start < 60:
            time.sleep(0.01)
        write(entry, *args)
    console.note, cache._write = noting, slow_write
    print("ready", flush=True)
    while not Path(sys.argv[3]).exists():  # both start together, however long each took to import torch
        time.sleep(0.01)
    ds = load_dataset("cifar10", sys.argv[1], cache_dir=sys.argv[2])
    x, y = ds.get_batch(range(len(ds)))
    print("sum", int(x.sum()), int(y.sum()), flush=True)
    """
)


def test_two_processes_converting_at_once_one_converts_the_other_reuses(tmp_path):
    data, cache, go = tmp_path / "data", tmp_path / "cache", tmp_path / "go"
    write_cifar10(data, n=40)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    procs = [
        subprocess.Popen([sys.executable, "-c", CONVERT, str(data), str(cache), str(go)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    assert [p.stdout.readline() for p in procs] == ["ready\n", "ready\n"]
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(out.count("converting") for out, _ in outs) == 1
    assert sum("waiting for process" in err for _, err in outs) == 1
    plain = load_dataset("cifar10", data)
    x, y = plain.get_batch(range(len(plain)))
    expected = f"sum {int(x.sum())} {int(y.sum())}"
    assert [out.splitlines()[-1] for out, _ in outs] == [expected, expected]
    [entry] = entries(cache)
    assert not list(entry.glob(".*tmp*"))


def test_training_on_the_cache_equals_training_on_the_decoded_data(tmp_path, capsys):
    """Same data, same order, same parameters, with DataLoader workers reading the mapped file too."""
    from imagetx import train
    from imagetx.storage.checkpoint import latest_checkpoint, load_checkpoint
    from support.runs import curve, tiny

    write_cifar10(tmp_path / "data", n=8)
    runs = {}
    for name, extra in [("off", ["data.cache_dir=off"]),
                        ("cache", [f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=1"])]:
        runs[name] = tmp_path / f"run-{name}"
        train.run(tiny(runs[name], "data.name=cifar10", f"data.data_dir={tmp_path / 'data'}",
                       "train.max_steps=12", *extra))
    [entry] = entries(tmp_path / "cache")
    assert f"memory-mapped from {entry})" in capsys.readouterr().err  # the run's summary says where
    assert curve(runs["off"]) == curve(runs["cache"])
    a, b = (load_checkpoint(latest_checkpoint(runs[n])) for n in ("off", "cache"))
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items())


def test_image_files_are_decoded_by_several_processes_with_progress(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    images = random_images(23, 40, 30)
    write_pngs(data / "train_32x32", images)  # 40x30 files: centre-cropped and resized while converting
    monkeypatch.setattr(data_cache, "CHUNK", 4)  # 6 batches over 2 worker processes
    monkeypatch.setattr(data_cache, "_decoders", lambda n: 2)
    cached = load_dataset("imagenet32", data, split="train", image_size=(16, 16), cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert "note: decoding ImageNet 32x32 (van den Oord et al. PNG version)" in err and "23/23 images" in err
    same(cached, load_dataset("imagenet32", data, split="train", image_size=(16, 16)))


def test_eval_uses_this_machines_cache_not_the_one_in_the_checkpoint(tmp_path):
    from imagetx.config import data_config_from_checkpoint

    ckpt = {"config": {"data": {"name": "cifar10", "cache_dir": "/elsewhere/cache"}}}
    assert data_config_from_checkpoint(ckpt).cache_dir is None


def test_an_empty_split_is_a_clear_error_not_an_empty_cache(tmp_path):
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "val_data.npz", data=np.zeros((0, 3072), np.uint8), labels=np.zeros(0, np.int64))
    with pytest.raises(DatasetError, match=r"ImageNet 32x32 .* valid split has no images"):
        load_dataset("imagenet32", tmp_path / "data", split="test", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npy"))
