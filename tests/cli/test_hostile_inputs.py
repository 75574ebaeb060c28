"""Hostile and careless inputs to every command, through the console script's entry point.

Each case must end in exit code 1 (runtime) or 2 (usage) with exactly one `error:` line on stderr
and no traceback; no file that existed before may change, and no temporary file may be left.
Cases come from a table (one per failure class the commands must handle) and from Hypothesis
(values drawn across the ranges of the numeric flags).
"""

from __future__ import annotations

import hashlib
import math
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
import torch
from PIL import Image

from imagetx.cli import main
from support.checkpoints import SR, write_generator
from support.checkpoints import write_superres


def snapshot(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def run_main(monkeypatch, capsys, args) -> tuple[int, str]:
    monkeypatch.setenv("IMAGETX_ALLOCATOR", "system")
    monkeypatch.setattr(sys, "argv", ["imagetx", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def check_refused(monkeypatch, capsys, root, args, codes=(1, 2), text=""):
    before = snapshot(root)
    code, err = run_main(monkeypatch, capsys, args)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code in codes, (args, code, err)
    assert len(errors) == 1 and text in errors[0], (args, err)
    assert "Traceback" not in err, (args, err)
    after = snapshot(root)
    assert {p: h for p, h in after.items() if p in before} == before, f"{args} changed an existing file"
    assert not [p for p in after if ".tmp-" in p.name], f"{args} left a temporary file"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    gen, _ = write_generator(root / "gen", attention="local1d", block_length=4)
    sr, _ = write_superres(root / "sr", **{k: v for k, v in SR.items()})
    (root / "not-a-checkpoint.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    (root / "empty.pt").write_bytes(b"")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (root / "text.png").write_text("this is text")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "ok.png")
    (root / "a-file").write_text("x")
    (root / "latin1.toml").write_bytes('[train]\nout = "caf\xe9"\n'.encode("latin-1"))
    torch.save({"fc.weight": torch.zeros(2), "x": RunsCode()}, root / "code.pt")  # unpickling it runs code
    (root / "random.pth").write_bytes(b"\x00" + np.random.default_rng(0).bytes(4096))
    five = torch.load(gen, weights_only=True)
    five["step"] = "five"
    torch.save(five, root / "five.pt")
    (root / "half-export").mkdir()  # an export without its weights
    (root / "half-export" / "config.json").write_text('{"format": "imagetx-export", "format_version": 1}')
    (root / "plotrun").mkdir()
    (root / "plotrun" / "metrics.jsonl").write_text('{"step": 1, "train_bpd": 5.0, "elapsed_s": 1.0}\n')
    return root, gen, sr


class RunsCode:
    """What a crafted file carries: unpickling it would call print (or anything else)."""

    def __reduce__(self):
        return (print, ("this ran",))


TABLE = [
    # sample
    (["sample"], 2, "Missing argument 'CHECKPOINT'"),
    (["sample", "{gen}", "--bogus"], 2, "No such option"),
    (["sample", "{gen}", "-n", "many"], 2, "Invalid value for '--num'"),
    (["sample", "{gen}", "-n", "0", "--out", "{out}/a.png"], 2, "--num must be >= 1"),
    (["sample", "{gen}", "-n", "-3", "--out", "{out}/a.png"], 2, "--num must be >= 1"),
    (["sample", "{gen}", "-n", 10**15, "--out", "{out}/a.png"], 2, "GiB of memory"),
    (["sample", "{gen}", "--seed", 10**20, "--out", "{out}/a.png"], 2, "--seed must be an integer"),
    (["sample", "{gen}", "--temperature", "nan", "--out", "{out}/a.png"], 2, "--temperature"),
    (["sample", "{gen}", "--temperature", "-1e-9", "--out", "{out}/a.png"], 2, "--temperature"),
    (["sample", "{gen}", "--temperature", "inf", "--out", "{out}/a.png"], 2, "--temperature"),
    (["sample", "{gen}", "--batch-size", "0", "--out", "{out}/a.png"], 2, "--batch-size"),
    (["sample", "{gen}", "--label", "1", "--out", "{out}/a.png"], 2, "unconditional"),
    (["sample", "{gen}", "--device", "tpu", "--out", "{out}/a.png"], 2, "--device"),
    (["sample", "{gen}", "--precision", "fp16", "--out", "{out}/a.png"], 2, "--precision must be one of auto, fp32, bf16"),
    (["sample", "{gen}", "--device", "cuda:7", "--out", "{out}/a.png"], 2, "CUDA"),
    (["sample", "{gen}", "--out", "{out}"], 2, "is a directory"),
    (["sample", "{gen}", "--out", "{root}/a-file/x.png"], 2, "is a file, not a directory"),
    (["sample", "{gen}", "--out", "{root}/no/such/dir/x.png"], 2, "does not exist"),
    (["sample", "{gen}", "--individual", "{root}/a-file"], 2, "not a directory"),
    (["sample", "{gen}", "--prime-rows", "2", "--out", "{out}/a.png"], 2, "--prime-rows needs --prime"),
    (["sample", "{gen}", "--prime", "{root}/broken.png", "--out", "{out}/a.png"], 1, "broken.png"),
    (["sample", "{gen}", "--prime", "{root}/text.png", "--out", "{out}/a.png"], 1, "text.png"),
    (["sample", "{gen}", "--prime", "{root}/missing.png", "--out", "{out}/a.png"], 1, "missing.png"),
    (["sample", "{gen}", "--prime", "{root}/ok.png", "--prime-rows", "99", "--out", "{out}/a.png"], 2, "--prime-rows"),
    (["sample", "{root}/missing.pt", "--out", "{out}/a.png"], 1, "missing.pt"),
    (["sample", "{root}/not-a-checkpoint.pt", "--out", "{out}/a.png"], 1, "not-a-checkpoint.pt"),
    (["sample", "{root}/empty.pt", "--out", "{out}/a.png"], 1, "empty.pt"),
    (["sample", "{root}/ok.png", "--out", "{out}/a.png"], 1, "ok.png"),
    (["sample", "{root}", "--out", "{out}/a.png"], 1, "no checkpoints"),
    (["sample", "{sr}", "--out", "{out}/a.png"], 2, "super-resolution model"),
    # superres
    (["superres", "{sr}"], 2, "--input"),
    (["superres", "{sr}", "--input", "{root}/ok.png", "--dataset", "builtin"], 2, "exactly one"),
    (["superres", "{sr}", "--input", "{root}/missing.png", "--out", "{out}/sr"], 2, "no such file"),
    (["superres", "{sr}", "--input", "{root}/broken.png", "--out", "{out}/sr"], 1, "broken.png"),
    (["superres", "{sr}", "--input", "{root}/ok.png", "--samples", "0", "--out", "{out}/sr"], 2, "--samples"),
    (["superres", "{sr}", "--input", "{root}/ok.png", "--temperature", "nan", "--out", "{out}/sr"], 2, "--temperature"),
    (["superres", "{sr}", "--input", "{root}/ok.png", "--out", "{root}/a-file"], 2, "not a directory"),
    (["superres", "{sr}", "--input", "{root}/ok.png", "--label", "0", "--out", "{out}/sr"], 2, "--label"),
    (["superres", "{sr}", "--input", "{root}/ok.png", "--seed", "-1", "--out", "{out}/sr"], 2, "--seed"),
    (["superres", "{sr}", "--input", "{root}/ok.png", "--precision", "half", "--out", "{out}/sr"], 2, "--precision"),
    (["superres", "{gen}", "--input", "{root}/ok.png", "--out", "{out}/sr"], 2, "not a super-resolution model"),
    (["superres", "{gen}", "--input", "{root}/ok.png", "--consistent", "--out", "{out}/sr"], 2, "not a super-resolution model"),
    (["superres", "{sr}", "--dataset", "cifar10", "--data-dir", "{root}/nowhere", "--out", "{out}/sr"], 1, "cifar10 not found"),
    # train (the configuration; the run itself: test_train.py)
    (["train", "--config", "{root}/latin1.toml", "--out", "{out}/run"], 2, "not UTF-8"),
    (["train", "--config", "{root}/missing.toml", "--out", "{out}/run"], 2, "does not exist"),
    (["train", "--set", "train.seed=100000000000000000000", "--out", "{out}/run"], 2, "train.seed"),
    (["train", "--set", "model.query_shape=[0, 4]", "--out", "{out}/run"], 2, "model.query_shape"),
    (["train", "--set", "model.nonsense=1", "--out", "{out}/run"], 2, "model.nonsense"),
    (["train", "--set", "oops", "--out", "{out}/run"], 2, "section.key=value"),
    (["train", "--max-steps", "x"], 2, "Invalid value"),
    (["train", "--set", "train.precision=fp16", "--out", "{out}/run"], 2, "train.precision must be one of auto, fp32, bf16"),
    # eval-bpd
    (["eval-bpd", "{root}/missing.pt"], 1, "missing.pt"),
    (["eval-bpd", "{gen}", "--precision", "fp64"], 2, "precision must be one of auto, fp32, bf16"),
    (["eval-bpd", "{gen}", "--source-model", "{gen}"], 2, "needs a super-resolution checkpoint"),
    (["eval-bpd", "{sr}", "--source-model", "{sr}"], 2, "must be an unconditional model of the low-resolution images"),
    (["eval-bpd", "{sr}", "--source-model", "{root}/missing.pt"], 1, "missing.pt"),
    (["eval-bpd", "{root}/not-a-checkpoint.pt"], 1, "not-a-checkpoint.pt"),
    # plot, export, eval-fid, train.logger
    (["plot"], 2, "Missing argument"),
    (["plot", "{root}/plotrun", "--out", "{out}"], 2, "is a directory"),
    (["plot", "{root}/plotrun", "--out", "{root}/a-file/c.png"], 2, "is a file, not a directory"),
    (["plot", "{root}/plotrun", "--out", "{root}/no/such/c.png"], 2, "does not exist"),
    (["plot", "{root}/gen/run", "--out", "{out}/c.png"], 1, "no metrics.jsonl"),
    (["export", "{root}/code.pt", "--out", "{out}/e"], 1, "imagetx never executes"),
    (["export", "{root}/five.pt", "--out", "{out}/e"], 1, "its step is 'five'"),
    (["export", "{root}/half-export", "--out", "{out}/e"], 1, "model.safetensors is missing"),
    (["export", "{gen}", "--out", "{out}/e", "--weights", "best"], 2, "--weights must be one of"),
    (["export", "{gen}", "--out", "{out}/e", "--weights", "ema"], 1, "no moving average"),
    (["eval-fid", "{gen}", "--inception-weights", "{root}/random.pth"], 1, "not a weights file at all"),
    (["eval-fid", "{gen}", "--inception-weights", "{root}/code.pt"], 1, "imagetx never executes"),
    (["eval-fid", "{gen}", "--inception-weights", "{root}/random.pth", "--cache-dir", "{root}/a-file"], 2, "not a directory"),
    (["eval-fid", "{gen}", "--inception-weights", "{root}/random.pth", "--weights", "x"], 2, "--weights must be one of"),
    (["eval-bpd", "{sr}", "--source-model", "{root}/code.pt"], 1, "imagetx never executes"),
    (["eval-bpd", "{sr}", "--source-model", "{root}/half-export"], 1, "model.safetensors is missing"),
    (["eval-bpd", "{sr}", "--source-model", "{root}/five.pt"], 1, "its step is 'five'"),
    (["superres", "{sr}", "--input", "{root}/ok.png", "--consistent", "--samples", "0", "--out", "{out}/sr"], 2, "--samples"),
    (["superres", "{sr}", "--input", "{root}/broken.png", "--consistent", "--out", "{out}/sr"], 1, "broken.png"),
    (["superres", "{sr}", "--input", "{root}/ok.png", "--weights", "x", "--out", "{out}/sr"], 2, "--weights must be one of"),
    (["sample", "{gen}", "--weights", "best", "--out", "{out}/a.png"], 2, "--weights must be one of"),
    (["sample", "{gen}", "--weights", "ema", "--out", "{out}/a.png"], 1, "no moving average"),
    (["sample", "{root}/code.pt", "--out", "{out}/a.png"], 1, "imagetx never executes"),
    (["sample", "{root}/half-export", "--out", "{out}/a.png"], 1, "model.safetensors is missing"),
    (["eval-bpd", "{root}/five.pt"], 1, "its step is 'five'"),
    (["eval-bpd", "{gen}", "--weights", "x"], 2, "--weights must be one of"),
    (["train", "--out", "{root}/a-file"], 2, "not a directory"),
    (["train", "--resume", "{root}/five.pt", "--out", "{out}/run"], 1, "its step is 'five'"),
    (["train", "--resume", "{root}/code.pt", "--out", "{out}/run"], 1, "imagetx never executes"),
    (["train", "--set", "data.cache_dir=", "--out", "{out}/run"], 2, "data.cache_dir"),
    (["train", "--set", "data.cache_dir=[1]", "--out", "{out}/run"], 2, "data.cache_dir"),
    (["plot", "{root}", "--out", "{out}/c.png"], 1, "no metrics.jsonl"),
    (["plot", "{root}/nowhere", "--out", "{out}/c.png"], 1, "no such directory"),
    (["export", "{gen}"], 2, "Missing option '--out'"),
    (["export", "{gen}", "--out", "{root}"], 1, "is not empty"),
    (["export", "{gen}", "--out", "{root}/a-file"], 2, "is not a directory"),
    (["export", "{root}/missing.pt", "--out", "{out}/e"], 1, "missing.pt"),
    (["export", "{root}/empty.pt", "--out", "{out}/e"], 1, "empty.pt"),
    (["eval-fid", "{gen}", "--inception-weights", "{root}/missing.pth"], 1, "pt_inception-2015-12-05-6726825d.pth"),
    (["eval-fid", "{gen}", "--inception-weights", "{root}/empty.pt"], 1, "not a readable weights file"),
    (["eval-fid", "{gen}", "--inception-weights", "{root}/empty.pt", "--dims", "100"], 2, "--dims"),
    (["eval-fid", "{gen}"], 2, "Missing option '--inception-weights'"),
    (["train", "--set", "train.logger=mlflow", "--out", "{out}/run"], 2, "train.logger must be one of none, tensorboard, wandb"),
]


@pytest.mark.parametrize("args,code,text", TABLE, ids=[" ".join(map(str, a))[:60] for a, _, _ in TABLE])
def test_hostile_input_is_one_error_line(files, tmp_path, monkeypatch, capsys, args, code, text):
    root, gen, sr = files
    names = {"root": root, "gen": gen, "sr": sr, "out": tmp_path}
    args = [a.format(**names) if isinstance(a, str) else a for a in args]
    check_refused(monkeypatch, capsys, root, args, codes=(code,), text=text)


def accepted(flag: str, text: str) -> bool:
    """Whether the command may rightly accept this value (then it is not a hostile input)."""
    try:
        number = float(text) if flag == "--temperature" else int(text)
    except ValueError:
        return False
    if flag == "--temperature":
        return math.isfinite(number) and number >= 0
    if flag == "--seed":
        return 0 <= number < 2**63
    if flag == "--batch-size":  # any size works: batches never exceed the images asked for
        return number >= 1
    return flag == "-n" and 1 <= number <= 10**6


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flag=st.sampled_from(["-n", "--seed", "--batch-size", "--temperature", "--label", "--prime-rows"]),
    value=st.one_of(
        st.integers(-(10**30), -1), st.integers(10**19, 10**30),
        st.sampled_from(["nan", "-inf", "1e400", "-0.5", "", " ", "0x10", "1_0", "١٢", "1e3"]),
        st.text(min_size=1, max_size=6).filter(lambda s: not s.startswith("-")),
    ),
)
def test_out_of_range_sample_values_are_usage_errors(files, tmp_path_factory, monkeypatch, capsys, flag, value):
    assume(not accepted(flag, str(value)))
    root, gen, _ = files
    out = tmp_path_factory.mktemp("o")
    check_refused(monkeypatch, capsys, root, ["sample", gen, flag, value, "--out", out / "a.png"], codes=(1, 2))


def test_an_empty_data_set_is_an_error_before_training(tmp_path, monkeypatch, capsys):
    from support.datasets import write_idx

    empty = (np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8))
    write_idx(tmp_path / "data", {"train": empty, "t10k": empty}, gz=False)
    args = ["train", "--dataset", "mnist", "--data-dir", tmp_path / "data", "--out", tmp_path / "run",
            "--set", "model.image_size=[8, 8]", "--set", "model.channels=1", "--set", "model.num_classes=0",
            "--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.d_ff=16"]
    check_refused(monkeypatch, capsys, tmp_path, args, codes=(1,), text="has no images")


def test_evaluation_refuses_a_result_that_is_not_finite(tmp_path, monkeypatch, capsys):
    import torch

    path, model = write_generator(tmp_path, attention="local1d", block_length=4, image_size=(4, 4))
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["head.weight"] = torch.full_like(ckpt["model"]["head.weight"], 3e38)  # finite, overflows
    ckpt["config"]["data"] = {"name": "builtin"}
    torch.save(ckpt, path)
    check_refused(monkeypatch, capsys, tmp_path, ["eval-bpd", path, "--limit", 4, "--json"], codes=(1,),
                  text="cannot be evaluated")
    assert capsys.readouterr().out == ""  # no JSON with a NaN in it


# ---- outputs in a directory that cannot be written: the same usage error in every command ----------
OUTPUTS = [
    ["sample", "{gen}", "--out", "{ro}/a.png"], ["sample", "{gen}", "--npz", "{ro}/a.npz"],
    ["sample", "{gen}", "--individual", "{ro}/each"], ["superres", "{sr}", "--input", "{root}/ok.png", "--out", "{ro}/sr"],
    ["plot", "{root}/plotrun", "--out", "{ro}/c.png"], ["export", "{gen}", "--out", "{ro}/e"],
    ["train", "--out", "{ro}/run"], ["eval-fid", "{gen}", "--inception-weights", "{root}/random.pth", "--cache-dir", "{ro}/c"],
]


@pytest.mark.parametrize("args", OUTPUTS, ids=[" ".join(a[:1] + a[-2:-1]) for a in OUTPUTS])
def test_an_output_in_a_read_only_directory_is_a_usage_error_everywhere(files, monkeypatch, capsys, args):
    import os

    root, gen, sr = files
    ro = root / "read-only"
    ro.mkdir(exist_ok=True)
    access = os.access  # tests may run as root, for whom every directory is writable: say it is not
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(ro) else access(p, mode, **kw))
    args = [a.format(root=root, gen=gen, sr=sr, ro=ro) for a in args]
    check_refused(monkeypatch, capsys, root, args, codes=(2,), text="writable")
    assert not any(ro.iterdir())


# ---- values drawn across the ranges of the newer options -------------------------------------------
def outside_unit_interval(value) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return True
    return not (math.isfinite(number) and 0.0 <= number < 1.0)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(["train.ema", "train.cooldown"]),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).filter(outside_unit_interval).map(repr),
        st.sampled_from(["1", "1.0", "-0.0001", "nan", "inf", "\"0.5\"", "[0.5]", "true", "1e400"]),
    ),
)
def test_moving_average_and_cooldown_outside_0_1_are_usage_errors(files, tmp_path_factory, monkeypatch, capsys, key, value):
    assume(outside_unit_interval(value))
    root, _, _ = files
    out = tmp_path_factory.mktemp("o")
    check_refused(monkeypatch, capsys, root, ["train", "--set", f"{key}={value}", "--out", out / "run"], codes=(2,), text=key)
    assert not (out / "run").exists()


def fid_accepted(flag: str, text: str) -> bool:
    try:
        number = float(text) if flag == "--temperature" else int(text)
    except ValueError:
        return False
    if flag == "--dims":
        return number in (64, 192, 768, 2048)
    if flag == "--temperature":
        return math.isfinite(number) and number >= 0
    if flag == "--seed":
        return 0 <= number < 2**63
    return number >= 1  # -n, --batch-size, --limit


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flag=st.sampled_from(["--dims", "-n", "--batch-size", "--limit", "--temperature", "--seed"]),
    value=st.one_of(st.integers(-(10**20), 4096).map(str), st.sampled_from(["nan", "-inf", "-0.5", "", "x", "1e400"])),
)
def test_eval_fid_values_out_of_range_are_usage_errors(files, monkeypatch, capsys, flag, value):
    assume(not fid_accepted(flag, value))
    root, gen, _ = files
    args = ["eval-fid", gen, "--inception-weights", root / "random.pth", flag, value]
    check_refused(monkeypatch, capsys, root, args, codes=(2,))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flag=st.sampled_from(["--samples", "--temperature", "--seed", "--batch-size"]),
    value=st.one_of(st.integers(-(10**20), 0).map(str), st.integers(2**63, 10**30).map(str),
                    st.sampled_from(["nan", "-inf", "-0.5", "", "x"])),
)
def test_consistent_superres_values_out_of_range_are_usage_errors(files, tmp_path_factory, monkeypatch, capsys, flag, value):
    # --samples past what memory holds is refused, like -n in `imagetx sample`
    assume(not (accepted("-n" if flag == "--samples" else flag, value)))
    root, _, sr = files
    out = tmp_path_factory.mktemp("o")
    args = ["superres", sr, "--input", root / "ok.png", "--consistent", flag, value, "--out", out / "sr"]
    check_refused(monkeypatch, capsys, root, args, codes=(2,))
