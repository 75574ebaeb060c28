"""Devices, sharding, and 2-process gloo runs on CPU under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from imagetx import eval_bpd, train
from imagetx.config import load_config
from imagetx.model.config import ConfigError
from imagetx.storage.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from imagetx.system import distributed as D
from imagetx.system.distributed import select_device, shard
from support import REPO as ROOT
from support.configs import TINY_MODEL

TINY = [
    *TINY_MODEL, "model.dropout=0.0",
    "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
    "train.sample_every=0", "train.checkpoint_every=0", "train.device=cpu",
]


def test_select_device():
    assert select_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            select_device("cuda:0")


class FakeGPUs:
    """`count` visible CUDA devices as torch.cuda reports them, without a GPU; `bound` lists the
    indices passed to torch.cuda.set_device, `groups` the backends of init_process_group."""

    def __init__(self, mp: pytest.MonkeyPatch, count: int, rank: int | None = None, world_size: int = 1,
                 local_rank: int = 0):
        self.bound, self.groups = [], []
        mp.setattr(torch.cuda, "is_available", lambda: count > 0)
        mp.setattr(torch.cuda, "device_count", lambda: count)
        mp.setattr(torch.cuda, "set_device", self.bound.append)
        mp.setattr(D.dist, "is_initialized", lambda: False)
        mp.setattr(D.dist, "init_process_group", lambda backend, **kwargs: self.groups.append(backend))
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.delenv(name, raising=False)
        if rank is not None:  # as torchrun sets them
            mp.setenv("RANK", str(rank))
            mp.setenv("WORLD_SIZE", str(world_size))
            mp.setenv("LOCAL_RANK", str(local_rank))


@given(count=st.integers(1, 8), local_rank=st.integers(0, 7), spec=st.sampled_from(["cuda", "auto"]))
@example(count=1, local_rank=7, spec="cuda")  # SLURM --gpus-per-task=1: every rank sees only its own GPU 0
@example(count=2, local_rank=3, spec="cuda")
@example(count=8, local_rank=7, spec="auto")
def test_each_torchrun_rank_binds_its_local_gpu(count, local_rank, spec):
    """Under torchrun, "cuda" and "auto" put local rank r on GPU r % (visible GPUs), made current
    before the NCCL group is joined: one GPU per process whether a node shows every process all
    of its GPUs or each process only its own."""
    with pytest.MonkeyPatch.context() as mp:
        gpus = FakeGPUs(mp, count, rank=10 + local_rank, world_size=16, local_rank=local_rank)
        ctx = D.setup(spec)
        assert ctx.device == torch.device("cuda", local_rank % count)
        assert gpus.bound == [local_rank % count] and gpus.groups == ["nccl"]
        assert (ctx.rank, ctx.world_size, ctx.local_rank) == (10 + local_rank, 16, local_rank)


@given(count=st.integers(1, 8), index=st.integers(0, 9))
@example(count=1, index=0)
@example(count=8, index=7)
def test_a_single_process_on_a_gpu_makes_it_current(count, index):
    """One process on cuda:N calls torch.cuda.set_device(N) ("cuda" and "auto" mean GPU 0), so
    that everything that uses the current device (compiled kernels, the allocator) uses it; an
    index this machine does not have is a ConfigError that names the ones it has."""
    with pytest.MonkeyPatch.context() as mp:
        gpus = FakeGPUs(mp, count)
        if index < count:
            assert D.setup(f"cuda:{index}").device == torch.device("cuda", index)
            assert gpus.bound == [index]
            for spec in ("cuda", "auto"):
                assert D.setup(spec).device == torch.device("cuda", 0)
            assert gpus.bound == [index, 0, 0] and gpus.groups == []
        else:
            have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            message = f"cuda:{index} requested but this machine has {count} GPU\\(s\\): {have}$"
            with pytest.raises(ConfigError, match=message):
                D.setup(f"cuda:{index}")
            assert gpus.bound == []


@given(world_size=st.integers(2, 16), index=st.integers(0, 7), count=st.integers(0, 8))
def test_a_numbered_gpu_under_torchrun_is_a_usage_error(world_size, index, count):
    """cuda:N would put every rank on one GPU: refused before any GPU is touched, saying what to
    do instead (also on a machine without CUDA, where it is the first thing to fix)."""
    with pytest.MonkeyPatch.context() as mp:
        gpus = FakeGPUs(mp, count, rank=world_size - 1, world_size=world_size, local_rank=0)
        with pytest.raises(ConfigError, match=f"device cuda:{index} would put all {world_size} processes .* "
                                              "use device cuda, .*CUDA_VISIBLE_DEVICES"):
            D.setup(f"cuda:{index}")
        assert gpus.bound == [] and gpus.groups == []


def test_cuda_asked_for_on_a_machine_without_it_is_a_usage_error(monkeypatch):
    gpus = FakeGPUs(monkeypatch, 0)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=f"device '{spec}' requested but CUDA is not available here"):
            D.setup(spec)
    assert D.setup("auto").device == torch.device("cpu") and gpus.bound == []


def test_shards_cover_every_index_once_without_padding():
    for n in (0, 1, 5, 7, 64):
        for world in (1, 2, 3, 8):
            parts = [list(shard(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


CHILD = """
import json, sys
import torch.distributed as dist
from imagetx import eval_bpd, train
from imagetx.config import load_config
from imagetx.system.distributed import distributed

ckpt, out, result_file, sets = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
with distributed("cpu") as ctx:  # joins the gloo group from torchrun's environment
    assert dist.get_world_size() == 2 and ctx.world_size == 2
    bpd = eval_bpd.run(eval_bpd.EvalConfig(ckpt, limit=7, batch_size=2, device="cpu", progress=False))
    summary = train.run(load_config(sets=sets + [f"train.out={out}"]))
    if ctx.is_main:
        with open(result_file, "w") as f:
            json.dump({"eval": bpd, "train": summary}, f)
"""


@pytest.mark.parametrize("precision, rel", [("fp32", 1e-5), ("bf16", 2e-3)])  # bf16 rounds per-process batches differently
def test_two_gloo_processes_match_one(tmp_path, precision, rel):
    # a checkpoint to evaluate, from a short single-process run
    base = tmp_path / "base"
    tiny = [*TINY, f"train.precision={precision}"]
    train.run(load_config(sets=[*tiny, "train.batch_size=4", "train.max_steps=2", f"train.out={base}"]))
    ckpt = latest_checkpoint(base)
    one = eval_bpd.run(eval_bpd.EvalConfig(ckpt, limit=7, batch_size=3, device="cpu", progress=False))

    child = tmp_path / "child.py"
    child.write_text(CHILD)
    result = tmp_path / "result.json"
    sets = [*tiny, "train.batch_size=2", "train.max_steps=3"]  # 2 processes x 2 = one process x 4
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(child), str(ckpt), str(tmp_path / "ddp"), str(result), json.dumps(sets)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads(result.read_text())

    # evaluation: every image counted once, the same number as one process
    assert two["eval"]["images"] == one["images"] == 7
    assert two["eval"]["bpd"] == pytest.approx(one["bpd"], rel=1e-9)

    # training: the same global batch gives the same losses as one process
    single = tmp_path / "single"
    train.run(load_config(sets=[*tiny, "train.batch_size=4", "train.max_steps=3", f"train.out={single}"]))
    losses = lambda run: [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "ddp") == pytest.approx(losses(single), rel=rel)  # rank 0 wrote each row once
    ddp_ckpt = load_checkpoint(latest_checkpoint(tmp_path / "ddp"))
    assert ddp_ckpt["world_size"] == 2 and len(ddp_ckpt["rng"]) == 2
    assert set(ddp_ckpt["model"]) == set(load_checkpoint(latest_checkpoint(single))["model"])  # no "module."
    assert ddp_ckpt["data_position"] == {"epoch": 0, "index": 12, "dataset_size": 20000}


RESUMABLE = """
import json, os, sys, time
from imagetx.config import load_config
import imagetx.train as T

out, pids, sets, resume = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
with open(os.path.join(pids, os.environ["RANK"]), "w") as f:
    f.write(str(os.getpid()))
step = T.Trainer.train_step
def slow(self, stream):  # so that the kill lands mid-run
    time.sleep(0.05)
    return step(self, stream)
T.Trainer.train_step = slow
T.run(load_config(sets=sets + [f"train.out={out}"]), resume=None if resume == "none" else resume)
"""


@pytest.mark.slow
def test_ddp_resume_after_one_process_is_killed_is_bit_exact(tmp_path):
    """2 gloo processes on a cached data set: SIGKILL one mid-run, resume both with --resume
    auto, and the parameters, losses and data position equal those of an uninterrupted run."""
    import signal
    import time

    from support.datasets import write_cifar10
    from support.runs import curve

    write_cifar10(tmp_path / "data", n=8)  # 40 training images: the run crosses epochs
    child = tmp_path / "child.py"
    child.write_text(RESUMABLE)
    sets = [*TINY, "model.dropout=0.1", "data.name=cifar10", f"data.data_dir={tmp_path / 'data'}",
            f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=2", "train.max_steps=16",
            "train.checkpoint_every=4", "train.keep_checkpoints=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def torchrun(out, resume="none") -> subprocess.Popen:
        pids = tmp_path / f"pids-{out.name}"
        pids.mkdir(exist_ok=True)
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(child), str(out), str(pids), json.dumps(sets), resume],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = torchrun(killed)
    uninterrupted = torchrun(straight)  # meanwhile; both runs fill the same cache entry
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000008.pt").exists():
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    time.sleep(0.1)  # a step or two more, never checkpointed
    os.kill(int((tmp_path / "pids-killed" / "1").read_text()), signal.SIGKILL)  # one process dies
    first.communicate(timeout=120)
    assert first.returncode != 0  # torchrun stops the other one
    assert max(s for s, _ in list_checkpoints(killed)) < 16

    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-3000:]
    resumed = torchrun(killed, resume="auto")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]

    assert curve(killed) == curve(straight)
    a, b = (load_checkpoint(latest_checkpoint(run)) for run in (straight, killed))
    assert a["step"] == b["step"] == 16 and a["data_position"] == b["data_position"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert len(list((tmp_path / "cache").iterdir())) == 1  # both runs used one cache entry


def test_processes_that_see_different_checkpoints_refuse_to_start(monkeypatch, tmp_path):
    """A node that cannot see the run directory would start afresh while the others resume."""
    from imagetx import train as T
    from imagetx.system.distributed import Dist
    from imagetx.errors import RunError

    monkeypatch.setattr(T, "all_gather_object", lambda obj: [obj, None])
    trainer = T.Trainer(load_config(sets=[*TINY, f"train.out={tmp_path}"]), Dist(world_size=2))
    with pytest.raises(RunError, match=r"process 0: step 8, process 1: none\); every node must see the same run"):
        trainer.set_up("auto", tmp_path / "step-8.pt", {"step": 8})


def _launch(args: list[str], processes: int, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    """`imagetx ARGS` in one process (torch's default threads: every core) or under torchrun with
    `processes` gloo processes of one thread each -> (the finished process, its wall seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "imagetx.cli", *args]
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   "-m", "imagetx.cli", *args]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def test_two_gloo_processes_sample_the_same_npz_as_one_byte_for_byte(tmp_path):
    from support.checkpoints import write_generator as write_checkpoint

    path, _ = write_checkpoint(tmp_path, attention="local1d", block_length=4, num_classes=3)
    # batches of 2: one process decodes images [0 1] [2 3] [4 5] [6], two decode [0 1] [2] and
    # [3 4] [5 6], each batch from its first image's global index
    args = ["sample", str(path), "-n", "7", "--batch-size", "2", "--seed", "5", "--device", "cpu", "--json"]
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        out.mkdir()
        proc, wall = _launch([*args, "--npz", str(out / "s.npz")], processes)
        assert proc.returncode == 0, proc.stderr[-4000:]
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1, proc.stdout  # the main process alone reports
        summary = json.loads(lines[0])
        assert summary["processes"] == processes and summary["written"] == [str(out / "s.npz")]
        assert sorted(os.listdir(out)) == ["s.npz"]  # written once, no stray temporary file
        results[processes] = (out / "s.npz").read_bytes(), summary["seconds"], wall
    assert results[2][0] == results[1][0]
    print(f"\nsampling 7 images: 1 process {results[1][1]:.2f} s ({results[1][2]:.1f} s wall), "
          f"2 gloo processes {results[2][1]:.2f} s ({results[2][2]:.1f} s wall)")


@pytest.mark.slow
def test_two_gloo_processes_super_resolve_a_dataset_as_one(tmp_path):
    from support.checkpoints import write_superres as write_checkpoint

    path, _ = write_checkpoint(tmp_path, data={"name": "builtin", "task": "superres", "builtin_size": 8},
                               image_size=(8, 8), source_size=(2, 2))
    # both modes (--consistent --report): unrestricted and consistent samples, 6 sequences each
    args = ["superres", str(path), "--dataset", "builtin", "-n", "3", "--samples", "2", "--batch-size", "4",
            "--seed", "2", "--device", "cpu", "--consistent", "--report", "--json"]
    files, metrics = {}, {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        proc, _ = _launch([*args, "--out", str(out)], processes)
        assert proc.returncode == 0, proc.stderr[-4000:]
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1, proc.stdout  # the main process alone reports
        metrics[processes] = json.loads(lines[0])["metrics"]
        files[processes] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len(files[1]) == 3 * 2 + 1  # a PNG per sample and comparison.png
    assert files[2] == files[1] and metrics[2] == metrics[1]
