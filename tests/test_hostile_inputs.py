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
from PIL import Image

from imagetx.cli import main
from test_sample import write_checkpoint as write_generator
from test_superres import SR
from test_superres import write_checkpoint as write_superres


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
    return root, gen, sr


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
    (["plot", "{root}", "--out", "{out}/c.png"], 1, "no metrics.jsonl"),
    (["plot", "{root}/nowhere", "--out", "{out}/c.png"], 1, "no such directory"),
    (["export", "{gen}"], 2, "Missing option '--out'"),
    (["export", "{gen}", "--out", "{root}"], 1, "is not empty"),
    (["export", "{gen}", "--out", "{root}/a-file"], 1, "is a file"),
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
    from test_data import write_idx

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
