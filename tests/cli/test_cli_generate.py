"""`imagetx sample` and `imagetx superres` from the command line: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from support.cli import invoke, one_error_line
from support.checkpoints import write_generator
from support.checkpoints import SR, rgb
from support.checkpoints import write_superres


def test_sample_writes_what_it_prints(tmp_path):
    path, _ = write_generator(tmp_path, attention="local1d", block_length=4, num_classes=2)
    grid, npz = tmp_path / "g.png", tmp_path / "s.npz"
    result = invoke("sample", path, "-n", 3, "--seed", 1, "--out", grid, "--npz", npz, "--label", 1)
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(grid), str(npz)]
    assert np.load(npz)["arr_0"].shape == (3, 5, 3, 3)
    result = invoke("sample", path, "-n", 2, "--out", grid, "--json", "--temperature", 0)
    summary = json.loads(result.stdout)
    assert summary["labels"] == [0, 1] and summary["temperature"] == 0.0


def test_sample_errors_are_one_line(tmp_path):
    path, _ = write_generator(tmp_path, attention="local1d", block_length=4)
    one_error_line(invoke("sample", path, "--temperature", -1, "--out", tmp_path / "a.png"), 2, "temperature")
    one_error_line(invoke("sample", tmp_path / "missing.pt"), 1, "missing.pt")
    one_error_line(invoke("sample", path, "--label", 3, "--out", tmp_path / "a.png"), 2, "unconditional")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    one_error_line(invoke("sample", path, "--prime", tmp_path / "bad.png", "--out", tmp_path / "a.png"), 1, "bad.png")
    assert not (tmp_path / "a.png").exists()


def test_sample_values_and_paths_out_of_range_are_usage_errors(tmp_path):
    path, _ = write_generator(tmp_path, attention="local1d", block_length=4)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    a = tmp_path / "a.png"
    for args, text in [
        (("--seed", 10**20, "--out", a), "--seed must be an integer in [0, "),
        (("--seed", -1, "--out", a), "--seed must be an integer in [0, "),
        (("--temperature", "inf", "--out", a), "finite"),
        (("--temperature", "nan", "--out", a), "finite"),
        (("--out", tmp_path / "dir"), "is a directory; give a file name"),
        (("--out", tmp_path / "file" / "a.png"), "is a file, not a directory"),
        (("--npz", tmp_path / "file" / "a.npz"), "is a file, not a directory"),
        (("--device", "gpu", "--out", a), "--device must be auto, cpu, cuda or cuda:N"),
        (("-n", 10**15, "--out", a), "--num: 1000000000000000 images of 45 bytes would take"),
    ]:
        one_error_line(invoke("sample", path, *args), 2, text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file", "run"]  # nothing written


def test_superres_directory_with_a_bad_file(tmp_path):
    path, _ = write_superres(tmp_path, **SR)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        Image.fromarray(rgb(2, 2, seed=i)).save(inputs / f"img{i}.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    out = tmp_path / "out"
    result = invoke("superres", path, "--input", inputs, "--samples", 2, "--out", out, "--report")
    assert result.exit_code == 1, result.output  # not everything asked for was done
    assert (out / "comparison.png").exists() and (out / "img1-sample-1.png").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: 1 of 3 inputs could not be used and were skipped; the others were written"]
    assert [line.split(":")[0] for line in result.stderr.splitlines() if "broken.png" in line] == ["warning"]
    assert "consistency" in result.stdout


def test_superres_refuses_an_unconditional_checkpoint(tmp_path):
    path, _ = write_generator(tmp_path, attention="local1d", block_length=4)
    Image.fromarray(rgb(2, 2)).save(tmp_path / "x.png")
    one_error_line(invoke("superres", path, "--input", tmp_path / "x.png", "--out", tmp_path / "o"), 2,
                   "not a super-resolution model")
    assert not (tmp_path / "o").exists()


def test_a_bug_shows_its_traceback_and_asks_for_a_report(tmp_path, monkeypatch):
    import imagetx.sample

    def broken(config):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(imagetx.sample, "run", broken)
    result = invoke("sample", tmp_path / "x.pt", "--out", tmp_path / "a.png")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError: a bug" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: this is a bug in imagetx: please report it")


def test_os_errors_are_one_line_and_debug_shows_tracebacks(tmp_path, monkeypatch):
    import errno

    import imagetx.sample

    def disk_full(config):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a.png"))

    monkeypatch.setattr(imagetx.sample, "run", disk_full)
    one_error_line(invoke("sample", tmp_path / "x.pt", "--out", tmp_path / "a.png"), 1, "a.png: No space left on device")
    monkeypatch.setenv("IMAGETX_DEBUG", "1")
    result = invoke("sample", tmp_path / "x.pt", "--out", tmp_path / "a.png")
    assert result.exit_code == 1 and isinstance(result.exception, OSError)


def test_decode_and_window_are_checked_and_give_the_same_images(tmp_path):
    path, _ = write_generator(tmp_path, attention="local1d", block_length=4)
    a = tmp_path / "a.png"
    one_error_line(invoke("sample", path, "--decode", "fast", "--out", a), 2, "--decode must be one of")
    one_error_line(invoke("sample", path, "--window", 0, "--out", a), 2, "--window must be a positive integer")
    assert invoke("sample", path, "--window", "2.5", "--out", a).exit_code == 2  # Typer's own parse error
    assert not a.exists()
    npz = {mode: tmp_path / f"{mode}.npz" for mode in ("sequential", "parallel", "auto")}
    for mode, out in npz.items():
        result = invoke("sample", path, "-n", 2, "--seed", 3, "--decode", mode, "--window", 5, "--npz", out)
        assert result.exit_code == 0, result.output
    images = [np.load(out)["arr_0"] for out in npz.values()]
    assert all(np.array_equal(images[0], other) for other in images[1:])


@pytest.mark.slow
def test_compile_is_checked_and_draws_the_same_images(tmp_path):
    # on CPU --compile takes the static step through Inductor (no CUDA graph): the images of the
    # eager decoder, in fp32 (bf16 would compare Inductor with the fused C step)
    path, _ = write_generator(tmp_path, attention="local1d", block_length=4)
    a = tmp_path / "a.png"
    one_error_line(invoke("sample", path, "--compile", "--no-cache", "--out", a), 2, "--compile decodes with the cache")
    logits, _ = write_generator(tmp_path / "logits", attention="local1d", block_length=4, relative="logits")
    one_error_line(invoke("sample", logits, "--compile", "--out", a), 2, "--compile: sampling with relative logits")
    assert not a.exists()
    npz = {flag: tmp_path / f"{flag}.npz" for flag in ("--compile", "--no-compile")}
    for flag, out in npz.items():
        result = invoke("sample", path, "-n", 2, "--seed", 3, "--precision", "fp32", flag, "--npz", out, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["decoder"] == ("compiled" if flag == "--compile" else "torch")
    assert np.array_equal(*(np.load(out)["arr_0"] for out in npz.values()))
