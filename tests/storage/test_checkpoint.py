"""Checkpoints: atomic writes, weights-only round trips, the newest, and clear errors."""

from __future__ import annotations

import random

import pytest
import torch

from imagetx.storage.checkpoint import (
    atomic_write, latest_checkpoint, list_checkpoints, load_checkpoint, make_checkpoint, rng_state, save_checkpoint,
    set_rng_state,
)
from imagetx.storage.weights import load_model
from imagetx.config import RunConfig, load_config
from imagetx.errors import CheckpointError
from imagetx.model.transformer import ImageTransformer
from support.configs import TINY_MODEL

TINY = [*TINY_MODEL, "model.image_size=[4, 4]", "model.channels=3", "model.block_length=8"]


def tiny_config(*extra: str) -> RunConfig:
    return load_config(sets=[*TINY, *extra])


def trained_state(config: RunConfig):
    torch.manual_seed(0)
    model = ImageTransformer(config.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1))
    x = torch.randint(0, 256, (2, 4, 4, 3))
    model.nll(x).mean().backward()
    opt.step()
    sched.step()
    return model, opt, sched, x


def test_round_trip_weights_only_and_load_model(tmp_path):
    config = tiny_config()
    model, opt, sched, x = trained_state(config)
    ckpt = make_checkpoint(
        model=model, config=config.to_dict(), step=5, optimizer=opt, scheduler=sched,
        data_position={"epoch": 1, "index": 3, "dataset_size": 10},
    )
    path = save_checkpoint(tmp_path, ckpt)
    assert path == tmp_path / "checkpoints" / "step-00000005.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 5 and raw["data_position"]["index"] == 3
    assert RunConfig.from_dict(raw["config"]) == config
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt2.load_state_dict(raw["optimizer"])
    loaded = load_model(path)
    assert not loaded.training and loaded.config == config.model
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.nll(x), model.nll(x))
    assert load_model(tmp_path).config == config.model  # a run directory means its newest


def test_compiled_or_wrapped_models_are_saved_unwrapped(tmp_path):
    config = tiny_config()
    model = ImageTransformer(config.model)
    compiled = torch.compile(model)  # wrapping is free; nothing compiles until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    ckpt = make_checkpoint(model=compiled, config=config.to_dict(), step=1)
    assert set(ckpt["model"]) == set(model.state_dict())
    ckpt["model"] = {f"module.{k}": v for k, v in ckpt["model"].items()}  # as DDP would name them
    load_model(save_checkpoint(tmp_path, ckpt))


def test_keep_last_k_and_latest(tmp_path):
    config = tiny_config()
    model = ImageTransformer(config.model)
    for step in (1, 2, 10, 3, 11):
        save_checkpoint(tmp_path, make_checkpoint(model=model, config=config.to_dict(), step=step), keep=3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 10, 11]
    (tmp_path / "checkpoints" / ".step-00000099.pt.tmp-1").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step-00000011.pt"
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, b"old")

    def explode(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, explode)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def one_line_error(path, match: str):
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and match in message, message


def test_bad_files_give_one_clear_line(tmp_path):
    config = tiny_config()
    model = ImageTransformer(config.model)
    good = save_checkpoint(tmp_path / "run", make_checkpoint(model=model, config=config.to_dict(), step=1))
    data = good.read_bytes()

    one_line_error(tmp_path / "missing.pt", "no such checkpoint file")
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    one_line_error(tmp_path / "truncated.pt", "truncated or corrupt")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 10)
    one_line_error(tmp_path / "noise.pt", "not an imagetx checkpoint at all")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "foreign.pt")
    one_line_error(tmp_path / "foreign.pt", "not an imagetx checkpoint")
    torch.save(model, tmp_path / "pickled.pt")
    one_line_error(tmp_path / "pickled.pt", "not an imagetx checkpoint")
    newer = dict(torch.load(good, weights_only=True), format_version=99)
    torch.save(newer, tmp_path / "newer.pt")
    one_line_error(tmp_path / "newer.pt", "upgrade imagetx")
    other = dict(torch.load(good, weights_only=True))
    other["config"] = tiny_config("model.n_layers=2").to_dict()  # weights of another architecture
    torch.save(other, tmp_path / "other.pt")
    one_line_error(tmp_path / "other.pt", "missing: blocks.1.")
    bad_config = dict(torch.load(good, weights_only=True))
    bad_config["config"] = {"model": {"n_layers": 0}}
    torch.save(bad_config, tmp_path / "badconfig.pt")
    one_line_error(tmp_path / "badconfig.pt", "model.n_layers must be a positive integer")
    (tmp_path / "empty").mkdir()
    one_line_error(tmp_path / "empty", "no checkpoints")
    assert load_checkpoint(good)["step"] == 1  # the good file is untouched by all of this


@pytest.mark.parametrize("geometry,version,warns", [
    (["model.query_shape=[2, 6]", "model.memory_flange=[1, 3]"], "0.1.0", True),  # exact tiling, 2 blocks per row
    (["model.query_shape=[2, 6]", "model.memory_flange=[1, 3]"], "0.1.1", False),
    (["model.query_shape=[3, 6]", "model.memory_flange=[1, 3]"], "0.1.0", False),  # a padded edge: was right
    (["model.query_shape=[2, 12]", "model.memory_flange=[1, 3]"], "0.1.0", False),  # one block per row: was right
])
def test_loading_a_local2d_model_trained_reading_its_targets_warns(tmp_path, geometry, version, warns):
    import warnings

    config = tiny_config("model.attention=local2d", *geometry)
    ckpt = make_checkpoint(model=ImageTransformer(config.model), config=config.to_dict(), step=1)
    ckpt["imagetx_version"] = version
    path = save_checkpoint(tmp_path, ckpt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(path)
    messages = [str(w.message) for w in caught if "retrain" in str(w.message)]
    assert len(messages) == int(warns)
    if warns:
        assert str(path) in messages[0] and "0.1.0" in messages[0]


def test_a_temporary_left_by_a_killed_save_is_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.pt.tmp-{int(dead.stdout)}"  # that process has exited
    stale.write_bytes(b"half a checkpoint")
    alive = tmp_path / ".model.pt.tmp-1"  # pid 1 runs: not ours to remove
    alive.write_bytes(b"someone else's save")
    atomic_write(tmp_path / "model.pt", b"whole")
    assert (tmp_path / "model.pt").read_bytes() == b"whole"
    assert not stale.exists() and alive.exists()


def test_weights_that_are_not_finite_or_of_the_wrong_type_are_refused(tmp_path):
    config = tiny_config()
    model = ImageTransformer(config.model)
    ckpt = make_checkpoint(model=model, config=config.to_dict(), step=1)
    ckpt["model"]["head.weight"] = ckpt["model"]["head.weight"].clone().fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"step-00000001.pt: its weights hold NaN or infinity \(head.weight\)"):
        load_model(save_checkpoint(tmp_path / "a", ckpt))
    ckpt = make_checkpoint(model=model, config=config.to_dict(), step=1)
    ckpt["model"]["head.weight"] = ckpt["model"]["head.weight"].long()
    with pytest.raises(CheckpointError, match=r"wrong type: head.weight torch.int64 vs torch.float32"):
        load_model(save_checkpoint(tmp_path / "b", ckpt))


def test_checkpoints_from_before_model_range_input_load_without_it(tmp_path):
    """A checkpoint's config written before model.range_input existed has no such key: it reads
    as false, and the weights (no range embedding) load strictly. A range_input model's load too."""
    from imagetx.data.transforms import area_downsample

    superres = ["data.task=superres", "model.source_size=[2, 2]", "model.encoder_layers=1", "model.consistent=true"]
    x = torch.randint(0, 256, (2, 4, 4, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    source = area_downsample(x, (2, 2))
    for extra, drop_key in (([], True), (["model.range_input=true"], False)):
        config = tiny_config(*superres, *extra)
        torch.manual_seed(0)
        model = ImageTransformer(config.model).eval()
        ckpt = make_checkpoint(model=model, config=config.to_dict(), step=1)
        if drop_key:
            del ckpt["config"]["model"]["range_input"]
        loaded = load_model(save_checkpoint(tmp_path / str(drop_key), ckpt))
        assert loaded.config == config.model and (loaded.range_embed is None) == drop_key
        torch.testing.assert_close(loaded.nll(x, source=source), model.nll(x, source=source))


class _RunsCode:
    """What a crafted checkpoint carries: unpickling it would call print (or anything else)."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_the_reader_says_what_a_file_is_and_never_relays_torchs_advice(tmp_path, recwarn):
    """Each kind of unusable file is one line that says what the file is; none repeats torch's
    suggestion of weights_only=False, and nothing in the file is executed."""
    import os
    import pickle

    from imagetx.storage.checkpoint import read_torch_file

    torch.save({"format": "imagetx-checkpoint", "x": _RunsCode()}, tmp_path / "code.pt")
    torch.save({"x": _RunsCode()}, tmp_path / "legacy-code.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"model": {}}, protocol=4))
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"a": torch.zeros(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "legacy-cut.pt").write_bytes((tmp_path / "legacy.pt").read_bytes()[:40])
    torch.save({"a": torch.zeros(3)}, tmp_path / "zip.pt")
    (tmp_path / "zip-cut.pt").write_bytes((tmp_path / "zip.pt").read_bytes()[:300])
    expected = {
        "code.pt": "carries Python objects or code", "legacy-code.pt": "carries Python objects or code",
        "pickle.pt": "carries Python objects or code", "random.pt": "not a weights file at all",
        "text.pt": "not a weights file at all", "empty.pt": "the file is empty",
        "legacy-cut.pt": "truncated or corrupt", "zip-cut.pt": "truncated or corrupt",
    }
    for name, words in expected.items():
        with pytest.raises(CheckpointError) as info:
            read_torch_file(tmp_path / name, "weights file")
        message = str(info.value)
        assert words in message and str(tmp_path / name) in message and "\n" not in message, message
        assert "weights_only" not in message and "PyTorch" not in message, message
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # torch's notes stay inside
    for name in ("legacy.pt", "zip.pt"):
        assert torch.equal(read_torch_file(tmp_path / name)["a"], torch.zeros(3))
    one_line_error(tmp_path / "code.pt", "imagetx never executes")


@pytest.mark.parametrize("field,value,words", [
    ("step", "five", "its step is 'five'"), ("step", -1, "its step is '-1'"), ("step", True, "its step is 'True'"),
    ("data_position", {"epoch": "x", "index": 0}, "data_position.epoch"), ("rng", [{"torch": 1}], "its rng"),
    ("cooldown", {"by_time": True, "start": "a", "end": 3}, "cooldown.start"), ("world_size", 0, "world_size"),
    ("optimizer", "adam", "its optimizer is 'adam'"), ("ema", [1], "its ema"),
])
def test_fields_of_the_wrong_type_are_one_line(tmp_path, field, value, words):
    config = tiny_config()
    model = ImageTransformer(config.model)
    ckpt = make_checkpoint(model=model, config=config.to_dict(), step=1)
    ckpt[field] = value
    torch.save(ckpt, path := tmp_path / "step-00000001.pt")
    one_line_error(path, words)
