"""The timers benchmarks/sampling.py reports from, run on a tiny model: each returns what its
report puts in the JSON (the whole script builds the 38M-parameter CIFAR-10 model and measures
the machine; gpu_check.sh runs it on a GPU)."""

from __future__ import annotations

import importlib.util
import json
import math

import torch

from imagetx import ImageTransformer
from support import REPO
from support.configs import tiny


def load_sampling():
    spec = importlib.util.spec_from_file_location("sampling_benchmark", REPO / "benchmarks" / "sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only: main() runs under __main__
    return module


def test_the_cached_and_static_timers_give_what_the_report_holds():
    sampling = load_sampling()
    torch.manual_seed(0)
    model = ImageTransformer(tiny("local1d", block_length=7)).eval()
    eager = sampling.cached_ms_per_step(model, 2, steps=4, start=3)
    fixed, compiled = sampling.static_ms_per_step(model, 2, steps=4, start=3)
    assert all(isinstance(ms, float) and math.isfinite(ms) and ms > 0 for ms in (eager, fixed))
    assert compiled is False  # on CPU the static step runs eagerly
    json.dumps({"static_ms_per_subpixel_step": fixed, "static_compiled": compiled})  # the report is JSON
