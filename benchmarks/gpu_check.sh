#!/usr/bin/env bash
# Everything the CPU cannot prove, in one command under five minutes on one GPU; a JSON summary.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # from anywhere; OUT_DIR default: ./gpu_check
#
# Runs from the source tree (PYTHONPATH=the repository, no pip install) with the machine's own
# torch, torchvision, typer, rich, tqdm, pillow, pytest and hypothesis; nothing is downloaded.
#   1. the tests marked `cuda` (tests/test_devices.py): every attention pattern's fast path against
#      a float64 dense reference on CUDA (outputs and gradients), the cache against the full pass,
#      bf16 autocast steps that lower the loss, torch.compile steps against eager, `imagetx train`
#      from the command line, eval-bpd on CUDA against CPU, torchrun with NCCL on every GPU;
#   2. benchmarks/train_step.py at the published CIFAR-10 config, bf16 autocast, torch.compile:
#      seconds per step, model FLOPs utilisation against this GPU's measured bf16 matmul peak;
#   3. benchmarks/sampling.py: cached sampling, ms per sub-pixel at batch 1 and batch 256.
# Each stage has its own time limit (180 + 100 + 60 s), so a stage that hangs or fails still leaves
# the others' numbers. Expected total on an H100 or H200: three to four minutes (an estimate: this
# script has not yet run on a GPU).
# Prints the summary and writes it, with each stage's full output, to OUT_DIR.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$ROOT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo '{"error": "no CUDA device: torch.cuda.is_available() is false"}' | tee "$OUT/gpu_check.json"
    exit 1
fi
start=$(date +%s)
timeout 180 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_devices.py \
    --junitxml="$OUT/cuda_tests.xml" >"$OUT/cuda_tests.log" 2>&1
tests_rc=$?
timeout 100 "$PY" benchmarks/train_step.py --device cuda --precision bf16 --compile --no-baseline \
    --steps 5 --peak-window 1 >"$OUT/train_step.json" 2>"$OUT/train_step.log"
train_rc=$?
timeout 60 "$PY" benchmarks/sampling.py --device cuda --precision bf16 --batches 1,256 --steps 64 \
    --slow-steps 1 >"$OUT/sampling.json" 2>"$OUT/sampling.log"
sampling_rc=$?

"$PY" - "$OUT" "$tests_rc" "$train_rc" "$sampling_rc" "$(( $(date +%s) - start ))" <<'PY' | tee "$OUT/gpu_check.json"
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, tests_rc, train_rc, sampling_rc, seconds = Path(sys.argv[1]), *map(int, sys.argv[2:])


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


summary = {
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "gpus": torch.cuda.device_count(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "seconds": seconds,
}
tests = {"exit_code": tests_rc}
try:
    suite = ET.parse(out / "cuda_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = suite.findall("testcase")
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    tests.update(passed=len(cases) - len(failed) - len(skipped), failed=len(failed), skipped=len(skipped),
                 failures={c.get("name"): (c.find("failure") if c.find("failure") is not None else c.find("error")).get("message", "")[:300]
                           for c in failed})
except (OSError, ET.ParseError, AttributeError):
    tests["error"] = "no test report: see cuda_tests.log"
summary["cuda_tests"] = tests

step = load("train_step.json")
summary["train_step_cifar10_bf16_compile"] = {"exit_code": train_rc} if step is None else {
    k: step.get(k) for k in ("best_seconds_per_step", "seconds_per_step", "first_step_seconds", "mfu",
                             "achieved_gflops", "matmul_peak_gflops", "peak_device_memory_gb", "precision")
}
sampling = load("sampling.json")
summary["sampling_cifar10_bf16"] = {"exit_code": sampling_rc} if sampling is None else {
    f"batch{b}": {k: sampling.get(f"batch{b}", {}).get(k) for k in ("ms_per_subpixel_step", "ms_per_image_subpixel",
                                                                  "roofline_ms", "measured_over_roofline")}
    for b in (1, 256)
}
summary["ok"] = tests_rc == 0 and tests.get("passed", 0) > 0 and step is not None and sampling is not None
print(json.dumps(summary, indent=1))
PY
