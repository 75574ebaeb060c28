"""The command line: argument handling, exit codes and one-line errors (CliRunner, in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagetx.eval_bpd import evaluate_bpd
from imagetx.storage.checkpoint import latest_checkpoint
from support.cli import invoke, one_error_line, sets
from support import REPO


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = invoke("train", "--out", out, "--max-steps", 2, "--device", "cpu", *sets())
    assert result.exit_code == 0, result.output
    return out


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "eval-bpd", "sample", "superres", "plot", "export", "eval-fid"):
        assert command in result.output
    for command in ("train", "eval-bpd", "sample", "superres", "plot", "export", "eval-fid"):
        assert invoke(command, "--help").exit_code == 0


def test_train_writes_a_run(run_dir):
    assert (run_dir / "config.toml").exists() and (run_dir / "metrics.jsonl").exists()
    assert latest_checkpoint(run_dir).name == "step-00000002.pt"
    assert (run_dir / "samples" / "step-00000002.png").exists()


def test_usage_errors_exit_2(tmp_path):
    one_error_line(invoke("train", "--out", tmp_path / "a", "--set", "train.lrr=1"), 2, "unknown key train.lrr")
    one_error_line(invoke("train", "--out", tmp_path / "a", "--set", "train.lr=-1"), 2, "train.lr must be > 0")
    one_error_line(invoke("train", "--set", "lr"), 2, "--set expects section.key=value")
    one_error_line(invoke("train", "--config", tmp_path / "none.toml"), 2, "none.toml does not exist")
    one_error_line(invoke("train", "--device", "cuda:7", "--out", tmp_path / "a", *sets("train.max_steps=1")),
                   2, "cuda:7")
    assert invoke("train", "--bogus").exit_code == 2
    assert invoke("eval-bpd", "x.pt", "--limit", "0").exit_code == 2
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("gpus, device, torchrun, text", [
    (0, "cuda", False, "device 'cuda' requested but CUDA is not available here; use cpu or auto"),
    (0, "cuda:0", False, "device 'cuda:0' requested but CUDA is not available here; use cpu or auto"),
    (1, "cuda:1", False, "device cuda:1 requested but this machine has 1 GPU(s): cuda:0"),
    (2, "cuda:2", False, "device cuda:2 requested but this machine has 2 GPU(s): cuda:0 to cuda:1"),
    (8, "cuda:3", True, "device cuda:3 would put all 2 processes of this torchrun job on one GPU: use device cuda"),
], ids=["no-cuda", "no-cuda-0", "1-gpu", "2-gpus", "torchrun"])
def test_a_device_this_machine_cannot_give_is_a_usage_error(monkeypatch, run_dir, tmp_path, gpus, device, torchrun, text):
    """A GPU that is absent or out of range, or a numbered GPU under torchrun: one `error:` line
    and exit 2 from every command that computes, before any GPU is bound or file written."""
    import torch

    def set_device(index):
        raise AssertionError(f"set_device({index}) for a refused device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        if torchrun:  # what torchrun sets for its first process (the one that prints)
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    one_error_line(invoke("train", "--device", device, "--out", tmp_path / "a", *sets("train.max_steps=1")), 2, text)
    one_error_line(invoke("eval-bpd", run_dir, "--limit", 2, "--device", device), 2, text)
    one_error_line(invoke("sample", run_dir, "-n", 1, "--device", device, "--out", tmp_path / "s.png"), 2, text)
    assert not (tmp_path / "a").exists() and not (tmp_path / "s.png").exists()


def test_runtime_errors_exit_1(run_dir, tmp_path):
    one_error_line(invoke("train", "--out", run_dir, *sets()), 1, "is not empty")
    one_error_line(invoke("eval-bpd", tmp_path / "missing.pt"), 1, "no such checkpoint file")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(latest_checkpoint(run_dir).read_bytes()[:1000])
    one_error_line(invoke("eval-bpd", truncated), 1, "truncated or corrupt")
    missing = invoke("train", "--out", tmp_path / "c", "--dataset", "cifar10", "--data-dir", tmp_path / "none", *sets())
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert missing.stderr.startswith("error: cifar10 not found in") and "cifar-10-batches-py" in missing.stderr
    assert not any((tmp_path / "c").iterdir())  # nothing but an empty directory: a retry works
    one_error_line(invoke("sample", tmp_path / "missing.pt", "--out", tmp_path / "o.png"), 1, "no such checkpoint file")
    one_error_line(invoke("superres", tmp_path / "missing.pt", "--dataset", "builtin", "--out", tmp_path / "o"), 1,
                   "no such checkpoint file")


def test_eval_bpd_json_and_table(run_dir):
    from imagetx.storage.weights import load_model
    from imagetx.data.batches import dataset_for
    from imagetx.config import RunConfig

    result = invoke("eval-bpd", run_dir, "--limit", 5, "--batch-size", 2, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"bpd", "images", "dataset", "split"} <= set(report)
    assert report["images"] == 5 and report["split"] == "test"
    model = load_model(latest_checkpoint(run_dir))
    config = RunConfig.from_dict(__import__("torch").load(latest_checkpoint(run_dir), weights_only=True)["config"])
    direct = evaluate_bpd(model, dataset_for(config.model, config.data, "test"), batch_size=5, limit=5)
    assert report["bpd"] == pytest.approx(direct["bpd"], rel=1e-6)
    table = invoke("eval-bpd", run_dir, "--limit", 5, "--device", "cpu")
    assert table.exit_code == 0 and "bits/dim" in table.stdout and f"{report['bpd']:.4f}" in table.stdout


def test_resume_auto_continues_the_run(run_dir):
    result = invoke("train", "--out", run_dir, "--resume", "auto", "--max-steps", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert latest_checkpoint(run_dir).name == "step-00000003.pt"
    one_error_line(
        invoke("train", "--out", run_dir, "--resume", "auto", "--set", "model.n_layers=3"), 2,
        "architecture comes from the checkpoint",
    )


def test_the_console_script_reports_usage_errors_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, IMAGETX_ALLOCATOR="system")
    script = [sys.executable, "-c", "from imagetx.cli import main; main()"]
    for args, text in [(["sample"], "Missing argument 'CHECKPOINT'"), (["sample", "x", "--bogus"], "No such option: --bogus"),
                       (["sample", "x", "-n", "abc"], "Invalid value for '--num'")]:
        result = subprocess.run(script + args, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr
        assert "see: imagetx sample --help" in lines[0]
    help_text = subprocess.run(script + ["train", "--help"], capture_output=True, text=True, env=env).stdout
    assert "[train.out]" in help_text and "<bool>" not in help_text  # no markup eaten, flags take no value
    usage = subprocess.run(script + ["sample", "--help"], capture_output=True, text=True, env=env).stdout
    assert usage.startswith("Usage: imagetx sample [OPTIONS] CHECKPOINT")


def test_eval_bpd_rejects_an_unknown_key_in_the_checkpoint(run_dir, tmp_path):
    import torch

    ckpt = torch.load(latest_checkpoint(run_dir), weights_only=True)
    ckpt["config"]["data"]["shuffle_buffer"] = 64
    path = tmp_path / "step-00000002.pt"
    torch.save(ckpt, path)
    one_error_line(invoke("eval-bpd", path, "--limit", 2, "--device", "cpu"), 1, "unknown key data.shuffle_buffer")


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5, 1.0])
def test_ctrl_c_while_the_console_script_starts_is_one_line(tmp_path, delay):
    """A real process, since the point is the interpreter importing imagetx and torch: a SIGINT at
    any moment of the first second after imagetx's code begins ends in exit 130 without a traceback.
    The clock starts when the process says it has started: before that Python itself is starting up
    (site, .pth files), where no program's code runs yet, and on a loaded machine that alone can
    take longer than the shortest delay."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = REPO
    env = dict(os.environ, IMAGETX_ALLOCATOR="system", PYTHONPATH=str(root))
    script = [sys.executable, "-c", "print('started', flush=True); from imagetx.cli import main; main()"]
    proc = subprocess.Popen(script + ["train", "--out", str(tmp_path / "run"), "--device", "cpu", "--max-steps", "100000",
                                      *sets()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline() == "started\n"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) <= 1, err


def test_the_window_option_s_default_is_the_decoder_s():
    """cli writes the default out (it imports no torch); the library's is the one that counts."""
    from imagetx.cli.options import window_option
    from imagetx.model.decoding import DEFAULT_WINDOW

    assert window_option().default == DEFAULT_WINDOW


# command -> (its library config, CLI parameter -> config field where the names differ, config
# fields the CLI does not set: the library's own switches, options whose default the command
# decides: sample's --out is samples.png unless --individual or --npz is given)
MIRRORED = {
    "sample": ("imagetx.sample:SampleConfig", {"no_cache": "use_cache"}, {"progress"}, {"out"}),
    "superres": ("imagetx.superres:SuperResConfig", {"input": "inputs"}, {"progress"}, set()),
    "eval_bpd": ("imagetx.eval_bpd:EvalConfig", {}, {"progress"}, set()),
    "eval_fid": ("imagetx.eval_fid:FidConfig", {}, {"progress"}, set()),
}


@pytest.mark.parametrize("command", sorted(MIRRORED))
def test_each_option_reaches_the_library_with_the_library_s_default(command):
    """A command's options mirror its library config: every field is an option (or a library
    switch), and a flag left out gives what the library does when the field is left out."""
    import dataclasses
    import importlib
    import inspect

    from imagetx.cli import commands

    path, renamed, library_only, decided = MIRRORED[command]
    module, name = path.split(":")
    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    options = inspect.signature(getattr(commands, command)).parameters
    reached = {renamed.get(p, p) for p in options}
    assert set(fields) - library_only <= reached, f"fields with no option: {set(fields) - library_only - reached}"
    for param, info in options.items():
        field = fields.get(renamed.get(param, param))
        if field is None or field.default is dataclasses.MISSING or param in decided:
            continue  # --json and the like; a required argument
        default = not info.default.default if param == "no_cache" else info.default.default
        assert default == field.default or str(default) == str(field.default), (param, default, field.default)
