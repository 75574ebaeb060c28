#!/usr/bin/env bash
# Everything the CPU cannot prove, in one command under five minutes on one GPU; a JSON summary.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # from anywhere; OUT_DIR default: ./gpu_check
#
# Runs from the source tree (PYTHONPATH=the repository, no pip install) with the machine's own
# PyTorch; nothing is downloaded. It first checks, in one short Python run (the preflight):
#   - that every package it needs imports (PACKAGES below: the package's dependencies in
#     pyproject.toml and the tests' pytest and hypothesis); any missing: the JSON names them and
#     the script exits 1 before starting anything else;
#   - that CUDA is available (if not: the same, exit 1);
#   - that torch.compile can build code on this machine (Triton, a C compiler, Python.h:
#     imagetx.system.compiling.toolchain_problems). If not, the stages run without torch.compile and the
#     JSON says `"compile": "skipped: ..."` with the reason.
# Then three stages:
#   1. the tests marked `cuda` (tests/system/test_devices.py): every attention pattern's fast path against
#      a float64 dense reference on CUDA (outputs and gradients), the cache against the full pass,
#      bf16 autocast steps that lower the loss, torch.compile steps against eager, `imagetx train`
#      from the command line, eval-bpd on CUDA against CPU, and with two or more GPUs torchrun
#      with NCCL on every GPU (with one GPU it is deselected: `"nccl": "skipped: 1 GPU"`);
#   2. benchmarks/train_step.py at the published CIFAR-10 width with 4 of its 12 layers (a cold
#      12-layer compile alone may take most of the budget), bf16 autocast, torch.compile: seconds
#      per step, model FLOPs utilisation against this GPU's measured bf16 matmul peak;
#   3. benchmarks/sampling.py: cached sampling of the full 12-layer model, ms per sub-pixel at
#      batch 1 and batch 256;
#   4. the same with the static-shape step `imagetx sample` takes on a GPU (imagetx/model/static.py),
#      compiled to a CUDA graph per step: ms per sub-pixel, its ratio to the roofline and its
#      speed-up over stage 3's eager step (a stage of its own: its compile may take long).
# The preflight and every stage run under `timeout -k 5 LIMIT` (the LIMIT_* values below:
# 25 + 105 + 70 + 35 + 35 = 270 s, 295 s with every stage killed 5 s after its limit), so a stage
# that hangs or fails still leaves the others' numbers, and a stage that runs out of time is
# recorded as `"timed_out": true` (with the tests that finished by then). The summary is
# computed without torch and written in every case; "ok" is true when every stage ran and
# passed ("compile" and "nccl" say what was skipped). The limits are estimates: this script has
# not yet run on a GPU.
# Prints the summary and writes it to OUT_DIR/gpu_check.json, beside each stage's full output.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$ROOT"
if ! command -v "$PY" >/dev/null; then  # the summary itself needs Python
    echo "{\"ok\": false, \"error\": \"no Python: $PY not found (set PYTHON)\"}" | tee "$OUT/gpu_check.json"
    exit 1
fi

# pip name:import name, for every package the tests and benchmarks import (tomli as well on
# Python < 3.11, where tomllib is missing: the preflight adds it)
PACKAGES="torch torchvision typer rich tqdm pillow:PIL numpy tomli-w:tomli_w safetensors matplotlib pytest hypothesis"
LIMIT_PREFLIGHT=25
LIMIT_TESTS=105
LIMIT_TRAIN=70
LIMIT_SAMPLING=35
LIMIT_STATIC=35
start=$(date +%s)
preflight_rc="" tests_rc="" train_rc="" sampling_rc="" static_rc="" tests_k=""
# a stage stopped by its limit leaves no report: never read an earlier run's in its place
for name in gpu_check.json preflight.json preflight.txt preflight.log cuda_tests.xml cuda_tests.log \
            train_step.json train_step.log sampling.json sampling.log static.json static.log; do
    rm -f "$OUT/$name"
done

summarize() {
    "$PY" - "$OUT" "$preflight_rc" "$tests_rc" "$train_rc" "$sampling_rc" "$static_rc" "$(( $(date +%s) - start ))" \
        "$tests_k" \
        <<'PY' | tee "$OUT/gpu_check.json"
import json, re, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
rcs = {name: int(rc) if rc else None
       for name, rc in zip(("preflight", "tests", "train", "sampling", "static"), sys.argv[2:7])}
seconds, tests_k = int(sys.argv[7]), sys.argv[8]


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


def stage(name: str) -> dict:
    """exit_code, and timed_out where `timeout` stopped it (124: TERM at the limit, 137: KILL 5 s later)."""
    rc = rcs[name]
    return {"exit_code": rc, "timed_out": rc in (124, 137)}


pre = load("preflight.json") or {}
summary = {k: pre.get(k) for k in ("gpu", "gpus", "torch", "cuda", "python")}
summary["seconds"] = seconds
if rcs["preflight"] != 0 or not pre:
    summary["preflight"] = stage("preflight")
    summary["error"] = "the preflight did not finish: see preflight.log"
elif pre["missing_packages"]:
    summary["missing_packages"] = pre["missing_packages"]
    summary["error"] = f"missing packages: {', '.join(pre['missing_packages'])} (pip install them; nothing else ran)"
elif not pre["gpus"]:
    summary["error"] = "no CUDA device: torch.cuda.is_available() is false (nothing else ran)"
if pre.get("gpus"):  # checked only where there is a GPU to compile for
    problems = pre["compile_problems"]
    summary["compile"] = "skipped: " + "; ".join(problems) if problems else "on"

if rcs["tests"] is not None:
    tests = stage("tests")
    if tests_k:
        tests["deselected"] = f"-k '{tests_k}'"
    results = {}  # test id -> passed | failed | error | skipped
    try:
        suite = ET.parse(out / "cuda_tests.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        failures = {}
        for case in suite.findall("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            results[case.get("name")] = ("failed" if problem is not None else
                                         "skipped" if case.find("skipped") is not None else "passed")
            if problem is not None:
                failures[case.get("name")] = problem.get("message", "")[:300]
        tests["failures"] = failures
    except (OSError, ET.ParseError, AttributeError):
        # no report (stopped by the limit, or crashed): the verbose log names each test as it ends
        try:
            log = (out / "cuda_tests.log").read_text(errors="replace")
        except OSError:
            log = ""
        for test, result in re.findall(r"::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", log):
            results[test] = result.lower()
        tests["error"] = "no test report (results read from cuda_tests.log, as far as it got)"
    for result in ("passed", "failed", "error", "skipped"):
        tests[result] = sum(r == result for r in results.values())
    summary["cuda_tests"] = tests
    nccl = [r for t, r in results.items() if "nccl" in t]
    gpus = pre.get("gpus") or 0
    summary["nccl"] = (f"skipped: {gpus} GPU" if gpus < 2 else nccl[0] if nccl else
                       "not reached (timed out)" if tests["timed_out"] else "not run")

if rcs["train"] is not None:
    step = load("train_step.json")
    summary["train_step_cifar10_bf16"] = {**stage("train"), "compile": summary.get("compile") == "on", **(
        {} if step is None else {k: step.get(k) for k in (
            "config", "best_seconds_per_step", "seconds_per_step", "first_step_seconds", "mfu",
            "achieved_gflops", "matmul_peak_gflops", "peak_device_memory_gb", "precision")})}
if rcs["sampling"] is not None:
    sampling = load("sampling.json")
    summary["sampling_cifar10_bf16"] = {**stage("sampling"), **({} if sampling is None else {
        f"batch{b}": {k: sampling.get(f"batch{b}", {}).get(k) for k in (
            "ms_per_subpixel_step", "ms_per_image_subpixel", "roofline_ms", "measured_over_roofline")}
        for b in (1, 256)})}
if rcs["static"] is not None:
    fixed = load("static.json")
    summary["sampling_static_cifar10_bf16"] = {**stage("static"), **({} if fixed is None else {
        f"batch{b}": {k: fixed.get(f"batch{b}", {}).get(k) for k in (
            "static_ms_per_subpixel_step", "static_compiled", "static_measured_over_roofline",
            "static_speedup_over_eager", "ms_per_subpixel_step", "roofline_ms")}
        for b in (1, 256)})}

summary["ok"] = "error" not in summary and all(
    rcs[name] == 0 for name in ("tests", "train", "sampling", "static")) and summary.get("cuda_tests", {}).get("passed", 0) > 0
print(json.dumps(summary, indent=1))
PY
}

# ---- preflight: packages, CUDA, what torch.compile needs ----------------------------------------
timeout -k 5 "$LIMIT_PREFLIGHT" "$PY" - "$OUT/preflight.json" $PACKAGES \
    >"$OUT/preflight.txt" 2>"$OUT/preflight.log" <<'PY'
import importlib, json, platform, sys

report = {"python": platform.python_version(), "missing_packages": [], "gpus": 0, "compile_problems": []}
packages = [spec.partition(":") for spec in sys.argv[2:]]
if sys.version_info < (3, 11):
    packages.append(("tomli", "", "tomli"))
for pip_name, _, module in packages:
    try:
        importlib.import_module(module or pip_name)
    except Exception as exc:  # not installed, or installed broken: either way the checks cannot run
        report["missing_packages"].append(pip_name)
        print(f"{pip_name}: {type(exc).__name__}: {exc}", file=sys.stderr)
if "torch" not in report["missing_packages"]:
    import torch

    report.update(torch=torch.__version__, cuda=torch.version.cuda)
    if torch.cuda.is_available():
        report.update(gpus=torch.cuda.device_count(), gpu=torch.cuda.get_device_name(0))
        from imagetx.system.compiling import toolchain_problems

        report["compile_problems"] = toolchain_problems("cuda")
with open(sys.argv[1], "w") as f:
    json.dump(report, f)
# for the shell: go on only with every package and a GPU; then the GPU count, compile on or off
print("go" if not report["missing_packages"] and report["gpus"] else "stop", report["gpus"],
      "off" if report["compile_problems"] else "on")
PY
preflight_rc=$?
read -r go gpus compile < <(tail -n 1 "$OUT/preflight.txt")
if [ "$preflight_rc" -ne 0 ] || [ "${go:-}" != go ]; then
    summarize
    exit 1
fi

# ---- 1. the CUDA tests ---------------------------------------------------------------------------
# torchrun with NCCL needs two GPUs to mean anything; without what torch.compile needs, the test of
# torch.compile itself cannot pass (`imagetx train` falls back to eager and still runs)
[ "$gpus" -lt 2 ] && tests_k="not nccl"
[ "$compile" = off ] && tests_k="${tests_k:+$tests_k and }not compiled"
timeout -k 5 "$LIMIT_TESTS" "$PY" -m pytest -v -m cuda -p no:cacheprovider tests/system/test_devices.py \
    ${tests_k:+-k "$tests_k"} --junitxml="$OUT/cuda_tests.xml" >"$OUT/cuda_tests.log" 2>&1
tests_rc=$?

# ---- 2. a training step --------------------------------------------------------------------------
compile_flag=""
[ "$compile" = on ] && compile_flag=--compile
timeout -k 5 "$LIMIT_TRAIN" "$PY" benchmarks/train_step.py --device cuda --precision bf16 $compile_flag \
    --no-baseline --layers 4 --steps 3 --peak-window 1 >"$OUT/train_step.json" 2>"$OUT/train_step.log"
train_rc=$?

# ---- 3. sampling ---------------------------------------------------------------------------------
timeout -k 5 "$LIMIT_SAMPLING" "$PY" benchmarks/sampling.py --device cuda --precision bf16 --batches 1,256 \
    --steps 64 --slow-steps 1 >"$OUT/sampling.json" 2>"$OUT/sampling.log"
sampling_rc=$?

# ---- 4. sampling through the static-shape step (a CUDA graph per step) ---------------------------
timeout -k 5 "$LIMIT_STATIC" "$PY" benchmarks/sampling.py --device cuda --precision bf16 --batches 1,256 \
    --steps 64 --static --static-only >"$OUT/static.json" 2>"$OUT/static.log"
static_rc=$?

summarize
grep -q '"ok": true' "$OUT/gpu_check.json"
