"""benchmarks/gpu_check.sh on this machine: what it checks before it starts, its JSON in every
case, and its time budget. What it measures needs a GPU; these tests need none (on a machine with
CUDA, the ones that would run the whole check are skipped)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TEXT = SCRIPT.read_text()
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole check")

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")), reason="needs bash and timeout")


def run_check(script: Path, out: Path, pythonpath: Path | None = None, **env: str) -> tuple[int, dict, str]:
    """(exit code, the JSON it printed (the same as OUT/gpu_check.json), its stderr)."""
    env = {**os.environ, "PYTHON": sys.executable, "IMAGETX_ALLOCATOR": "system", **env}
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, env=env, timeout=240)
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "gpu_check.json").read_text())
    return result.returncode, summary, result.stderr


def limits(text: str) -> tuple[dict[str, int], list[tuple[int, str]]]:
    """The LIMIT_* values, and each `timeout` line's (kill grace, LIMIT name)."""
    values = {name: int(v) for name, v in re.findall(r"^(LIMIT_\w+)=(\d+)$", text, re.M)}
    lines = [line for line in text.splitlines() if re.match(r"\s*timeout\b", line)]
    uses = []
    for line in lines:
        found = re.match(r'\s*timeout -k (\d+) "\$(LIMIT_\w+)" ', line)
        assert found, f"every stage runs under `timeout -k N \"$LIMIT_...\"`: {line}"
        uses.append((int(found[1]), found[2]))
    return values, uses


def test_the_stage_limits_add_up_to_under_five_minutes():
    """Each timeout line's limit plus the 5 s before a hung stage is killed, summed: the worst
    case of the whole script (the summary at the end reads files and imports no torch)."""
    values, uses = limits(TEXT)
    assert sorted(name for _, name in uses) == sorted(values)  # every limit used, each once
    assert {"LIMIT_PREFLIGHT", "LIMIT_TESTS", "LIMIT_TRAIN", "LIMIT_SAMPLING", "LIMIT_STATIC"} <= set(values)
    worst = sum(values[name] + grace for grace, name in uses)
    assert worst < 300, (values, worst)
    header = re.search(r"LIMIT_\* values below:\n# ([\d +]+) = (\d+) s, (\d+) s with every stage killed", TEXT)
    assert header and sum(map(int, header[1].split("+"))) == int(header[2]) == sum(values.values())
    assert int(header[3]) == worst  # the header says what the code does


def test_every_package_the_project_imports_is_checked():
    """pyproject.toml's dependencies and the tests' pytest and hypothesis are in the script's list
    (tomli-w was missing from it, and `imagetx` imports it at start-up)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    packages = {spec.partition(":")[0] for spec in re.search(r'^PACKAGES="([^"]+)"', TEXT, re.M)[1].split()}
    for requirement in (*project["dependencies"], "pytest", "hypothesis"):
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower()
        if "python_version" in requirement:  # tomli, on Python < 3.11 only: the preflight adds it there
            assert f'packages.append(("{name}"' in TEXT, requirement
        else:
            assert name in packages, requirement


def test_bash_can_parse_it():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@NO_GPU
def test_without_cuda_it_stops_at_once_and_says_so_in_its_json(tmp_path):
    code, summary, _ = run_check(SCRIPT, tmp_path / "out")
    assert code == 1 and summary["ok"] is False
    assert summary["error"] == "no CUDA device: torch.cuda.is_available() is false (nothing else ran)"
    assert summary["gpus"] == 0 and summary["torch"] == torch.__version__
    assert not {"cuda_tests", "train_step_cifar10_bf16", "sampling_cifar10_bf16", "sampling_static_cifar10_bf16",
                "compile"} & set(summary)


@NO_GPU
def test_a_missing_package_is_named_and_nothing_starts(tmp_path):
    """tomli_w as a machine without it has it: importing fails."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "tomli_w.py").write_text('raise ModuleNotFoundError("No module named \'tomli_w\'")\n')
    code, summary, _ = run_check(SCRIPT, tmp_path / "out", pythonpath=stubs)
    assert code == 1 and summary["ok"] is False and summary["missing_packages"] == ["tomli-w"]
    assert summary["error"] == "missing packages: tomli-w (pip install them; nothing else ran)"
    assert "tomli-w: ModuleNotFoundError: No module named 'tomli_w'" in (tmp_path / "out" / "preflight.log").read_text()


FAKE_GPU = '''
import sys
# the preflight (python - OUT/preflight.json ...) sees one GPU; the training step hangs
if sys.argv[0] == "-" and sys.argv[1:2] and sys.argv[1].endswith("preflight.json"):
    import torch

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_name = lambda index=0: "Fake GPU"
elif sys.argv[0].endswith("train_step.py"):
    import time

    time.sleep(600)
'''


@pytest.mark.slow
@NO_GPU
def test_one_gpu_without_a_compiler_and_a_stage_out_of_time(tmp_path):
    """As on a GPU machine with one GPU, no C compiler and a training step that hangs: compile is
    skipped and says why, so is the NCCL test, and the stage stopped by its limit is recorded as
    timed out in a JSON that is still written. The repository is linked into tmp_path with the
    script's training-step limit cut to 3 s; the tests then find no real GPU and skip."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    for name in ("imagetx", "tests", "pyproject.toml", "benchmarks/train_step.py", "benchmarks/sampling.py",
                 "benchmarks/common.py"):
        (repo / name).symlink_to(ROOT / name)
    assert "\nLIMIT_TRAIN=70\n" in TEXT
    (repo / "benchmarks" / "gpu_check.sh").write_text(TEXT.replace("\nLIMIT_TRAIN=70\n", "\nLIMIT_TRAIN=3\n"))
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_GPU)
    code, summary, _ = run_check(repo / "benchmarks" / "gpu_check.sh", tmp_path / "out", pythonpath=fake,
                                 CC=str(tmp_path / "no-cc"))
    assert code == 1 and summary["ok"] is False and "error" not in summary
    assert (summary["gpu"], summary["gpus"]) == ("Fake GPU", 1)
    assert summary["compile"] == f"skipped: no C compiler ($CC, gcc or clang): {tmp_path / 'no-cc'} not found"
    assert summary["nccl"] == "skipped: 1 GPU"
    assert summary["cuda_tests"]["deselected"] == "-k 'not nccl and not compiled'"
    assert summary["train_step_cifar10_bf16"] == {"exit_code": 124, "timed_out": True, "compile": False}
    assert summary["sampling_cifar10_bf16"]["exit_code"] not in (0, 124, 137)  # no GPU behind the fake
    assert summary["sampling_cifar10_bf16"]["timed_out"] is False
    assert summary["sampling_static_cifar10_bf16"]["exit_code"] not in (0, 124, 137)
