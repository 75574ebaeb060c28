"""Training runs: the run directory, exact resume after SIGKILL, SIGINT, NaN, time limits, bad dirs."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imagetx import train
from imagetx.config import RunConfig, load_config
from imagetx.data.order import DataOrder
from imagetx.errors import CheckpointError, RunError
from imagetx.model.config import ConfigError
from imagetx.storage.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from imagetx.training.optim import lr_factor
from support.runs import TINY, tiny
from support.runs import curve, rows
from support import REPO as ROOT



def script(tmp_path: Path, body: str) -> Path:
    """A Python script that runs imagetx in a child process; `slow` makes each step take 20 ms
    longer so that signals land mid-run."""
    path = tmp_path / "child.py"
    path.write_text(
        "import sys, time\n"
        "import imagetx.train as T\n"
        "step = T.Trainer.train_step\n"
        "def slow(self, stream):\n"
        "    time.sleep(0.02)\n"
        "    return step(self, stream)\n"
        "T.Trainer.train_step = slow\n" + body
    )
    return path


def start(path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this source tree, whatever is installed
    return subprocess.Popen(
        [sys.executable, str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_schedule_warmup_then_rsqrt_cosine_constant():
    f = lr_factor
    assert [f(s, "rsqrt", 4, 100) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert f(16, "rsqrt", 4, 100) == 0.5  # step^-0.5 after the peak
    assert f(1, "rsqrt", 0, 100) == 1.0 and f(4, "rsqrt", 0, 100) == 0.5
    assert f(4, "cosine", 4, 104) == 1.0 and f(54, "cosine", 4, 104) == pytest.approx(0.5)
    assert f(104, "cosine", 4, 104) == pytest.approx(0.0, abs=1e-12)
    assert f(50, "constant", 4, 100) == 1.0


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_the_fused_optimizer_takes_the_steps_of_the_textbook_one(optimizer):
    """make_optimizer's fused kernel against torch's single-tensor Adam/AdamW: same parameters after
    a few steps with the configured betas, eps, weight decay and a changing learning rate."""
    from imagetx.training.optim import make_optimizer

    config = load_config(None, sets=[f"train.optimizer={optimizer}", "train.weight_decay=0.01", "train.warmup_steps=2"])
    torch.manual_seed(0)
    ours = torch.nn.Linear(5, 3)
    plain = torch.nn.Linear(5, 3)
    plain.load_state_dict(ours.state_dict())
    opt, sched, _ = make_optimizer(ours, config)
    assert opt.defaults["fused"]
    t = config.train
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    ref = cls(plain.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, foreach=False)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, sched.lr_lambdas[0])
    for _ in range(4):
        x = torch.randn(8, 5)
        for model, o, s in ((ours, opt, sched), (plain, ref, ref_sched)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
            s.step()
    for a, b in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_data_order_visits_every_image_once_per_epoch():
    order = DataOrder(10, seed=3)
    seen, epoch, index = [], 0, 0
    for _ in range(5):  # 5 steps of 4 = two epochs exactly, crossing the boundary mid-step
        idx, epoch, index = order.take(epoch, index, 4)
        seen += idx
    assert (epoch, index) == (2, 0)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a new permutation each epoch


def test_a_run_writes_a_self_describing_directory(tmp_path):
    out = tmp_path / "run"
    config = tiny(
        out, "train.max_steps=6", "train.eval_every=3", "train.eval_images=8", "train.sample_every=6",
        "train.sample_count=4", "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.log_every=2",
    )
    summary = train.run(config)
    assert summary["status"] == "completed" and summary["step"] == 6
    assert load_config(out / "config.toml") == config
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]
    assert [p.name for p in (out / "samples").iterdir()] == ["step-00000006.png"]
    train_rows = rows(out)
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for r in train_rows:
        assert {"loss", "train_bpd", "lr", "grad_norm", "images_per_sec"} <= set(r)
        assert 0 < r["loss"] < 9 and r["images_per_sec"] > 0
    evals = rows(out, "eval_bpd")
    assert [(r["step"], r["eval_images"], r["eval_split"]) for r in evals] == [(3, 8, "test"), (6, 8, "test")]
    assert summary["eval_bpd"] == evals[-1]["eval_bpd"]
    ckpt = load_checkpoint(out / "checkpoints" / "step-00000006.pt")
    assert ckpt["data_position"] == {"epoch": 0, "index": 24, "dataset_size": 20000}
    assert RunConfig.from_dict(ckpt["config"]) == config


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, precision):
    extra = ["train.max_steps=24", "train.grad_accum=2", "train.grad_clip=0.5", f"train.precision={precision}",
             "train.ema=0.8"]
    straight = tmp_path / "straight"
    train.run(tiny(straight, *extra))

    killed = tmp_path / "killed"
    child = script(
        tmp_path,
        "from imagetx.config import load_config\n"
        f"T.run(load_config(sets={[*TINY, f'train.out={killed}', *extra]!r}))\n",
    )
    proc = start(child)
    wait_for(lambda: (killed / "checkpoints" / "step-00000010.pt").exists(), proc)
    time.sleep(0.06)  # a few more steps, logged but never checkpointed
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    steps = [s for s, _ in list_checkpoints(killed)]
    assert steps and max(steps) < 24, steps

    summary = train.run(tiny(killed, *extra), resume="auto")
    assert summary["step"] == 24
    assert curve(killed) == curve(straight)
    a = load_checkpoint(latest_checkpoint(straight))
    b = load_checkpoint(latest_checkpoint(killed))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
        assert torch.equal(a["ema"][name], b["ema"][name]), name  # the moving average too
    assert a["data_position"] == b["data_position"]


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "run"
    child = script(
        tmp_path,
        "from imagetx.cli import app\n"
        f"sys.argv = ['imagetx', 'train', '--out', {str(out)!r}, '--max-steps', '100000']"
        f" + [a for s in {TINY!r} for a in ('--set', s)]\n"
        "app()\n",
    )
    proc = start(child)
    wait_for(lambda: (out / "checkpoints" / "step-00000005.pt").exists(), proc)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "SIGINT: stopping after this step" in err and "Traceback" not in err
    step = load_checkpoint(latest_checkpoint(out))["step"]
    assert step >= 5 and step == rows(out)[-1]["step"]
    assert f"interrupted at step {step}" in err


def poison_forward(monkeypatch, at: int, value: float) -> dict:
    """Multiply the loss of the `at`-th forward pass by `value` (nan, inf) -> {"n": passes so far}."""
    calls = {"n": 0}
    forward = train.Objective.forward

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        nll = forward(self, *args, **kwargs)
        return nll * value if calls["n"] == at else nll

    monkeypatch.setattr(train.Objective, "forward", poisoned)
    return calls


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    poison_forward(monkeypatch, 8, float("nan"))
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"loss is nan at step 8: training stopped") as info:
        train.run(tiny(out, "train.max_steps=20"))
    assert "step-00000005.pt" in str(info.value)
    assert [s for s, _ in list_checkpoints(out)] == [5]
    assert rows(out)[-1]["step"] == 7
    assert all(math.isfinite(r["loss"]) for r in rows(out))


def test_a_nonfinite_step_read_steps_later_is_named_and_nothing_after_it_is_saved(tmp_path, monkeypatch):
    # the losses stay on the device until a metrics row or a checkpoint reads them: step 3 goes
    # bad, step 5 reads it, before its checkpoint
    calls = poison_forward(monkeypatch, 3, float("inf"))
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"loss is inf at step 3: training stopped, nothing saved since; no checkpoint"):
        train.run(tiny(out, "train.max_steps=20", "train.log_every=10", "train.checkpoint_every=5"))
    assert list_checkpoints(out) == [] and calls["n"] == 5


def test_the_optimizer_skips_a_step_marked_not_finite_on_the_device():
    # what lets the loop read its losses late: the fused step leaves weights and state alone
    from imagetx.config import RunConfig
    from imagetx.training.optim import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer, _, _ = make_optimizer(model, RunConfig())
    assert optimizer.defaults["fused"]
    for found_inf, changes in ((0.0, True), (1.0, False), (0.0, True)):
        model(torch.randn(2, 4)).sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.found_inf = torch.tensor(found_inf)
        optimizer.step()
        optimizer.zero_grad()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())) == changes
    assert all(float(optimizer.state[p]["step"]) == 2 for p in model.parameters())  # the skipped step is not counted


def test_time_limit_stops_cleanly_with_a_checkpoint(tmp_path):
    summary = train.run(tiny(tmp_path / "run", "train.max_steps=100000", "train.max_minutes=0.0001"))
    assert summary["status"] == "time_limit" and train.EXIT_STATUS["time_limit"] == 0
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == summary["step"] < 100000


def test_a_time_limit_ends_like_max_steps_with_a_held_out_number_and_a_grid_of_the_last_step(tmp_path, capsys):
    out = tmp_path / "run"
    summary = train.run(tiny(out, "train.max_steps=100000", "train.max_minutes=0.0001", "train.eval_every=1000",
                             "train.eval_images=8", "train.sample_every=1000", "train.sample_count=4"))
    step = summary["step"]
    assert summary["status"] == "time_limit" and summary["eval_step"] == step < 1000
    assert [r["step"] for r in rows(out, "eval_bpd")] == [step]
    assert summary["eval_bpd"] == rows(out, "eval_bpd")[-1]["eval_bpd"]
    assert (out / "samples" / f"step-{step:08d}.png").exists(), sorted(os.listdir(out / "samples"))
    assert f"at step {step}, held-out {summary['eval_bpd']:.4f} bits/dim; checkpoint" in capsys.readouterr().err


def test_output_directory_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="is not empty .* --resume auto"):
        train.run(tiny(out, "train.max_steps=1"))
    assert os.listdir(out) == ["notes.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunError, match="cannot write to the output directory"):
        train.run(tiny(blocker / "run", "train.max_steps=1"))


def test_resume_keeps_the_architecture_and_can_extend_a_run(tmp_path):
    out = tmp_path / "run"
    train.run(tiny(out, "train.max_steps=3"))
    with pytest.raises(ConfigError, match=r"model.n_layers = 2 \(checkpoint: 1\)"):
        train.run(tiny(out, "train.max_steps=6", "model.n_layers=2"), resume="auto")
    summary = train.run(tiny(out, "train.max_steps=6"), resume="auto")
    assert summary["step"] == 6 and [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]


def test_resume_from_python_adopts_the_checkpoint_like_the_cli(tmp_path):
    from typer.testing import CliRunner

    from imagetx.cli import app

    first = tmp_path / "python"
    train.run(tiny(first, "train.max_steps=3"))
    second = tmp_path / "cli"
    train.run(tiny(second, "train.max_steps=3"))
    # the quickstart model (full attention, 3 layers, RGB) differs from the checkpoint's, but no
    # model key is given: the architecture and the other settings come from the checkpoint
    config = load_config(sets=[f"train.out={first}", "train.max_steps=5"])
    assert config.model != tiny(first).model
    summary = train.run(config, resume="auto")
    args = ["train", "--out", str(second), "--resume", "auto", "--set", "train.max_steps=5"]
    result = CliRunner().invoke(app, args)
    assert summary["step"] == 5 and result.exit_code == 0, result.output
    a, b = load_checkpoint(latest_checkpoint(first)), load_checkpoint(latest_checkpoint(second))
    expected = tiny(first, "train.max_steps=5").to_dict()
    assert a["config"] == expected and {**b["config"], "train": {**b["config"]["train"], "out": str(first)}} == expected
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert curve(first) == curve(second)


def test_resume_from_a_checkpoint_with_an_unknown_key_is_a_clear_error(tmp_path):
    from imagetx.errors import CheckpointError

    out = tmp_path / "run"
    train.run(tiny(out, "train.max_steps=2"))
    path = latest_checkpoint(out)
    ckpt = load_checkpoint(path)
    ckpt["config"]["data"]["shuffle_buffer"] = 64
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"unknown key data\.shuffle_buffer"):
        train.run(tiny(out, "train.max_steps=4"), resume="auto")


def test_resume_from_a_checkpoint_path(tmp_path):
    first = tmp_path / "first"
    train.run(tiny(first, "train.max_steps=6"))
    with pytest.raises(RunError, match=r"has checkpoints newer than .*step-00000005\.pt \(up to step-00000006\.pt\)"):
        train.run(tiny(first, "train.max_steps=8"), resume=first / "checkpoints" / "step-00000005.pt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="belongs to another run"):
        train.run(tiny(other, "train.max_steps=8"), resume=first)
    summary = train.run(tiny(tmp_path / "new", "train.max_steps=8"), resume=first)
    assert summary["step"] == 8 and [s for s, _ in list_checkpoints(tmp_path / "new")] == [8]


def test_resume_auto_falls_back_from_a_corrupt_newest_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train.run(tiny(out, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0"))
    (newest := latest_checkpoint(out)).write_bytes(newest.read_bytes()[:500])  # cut off by a crash
    capsys.readouterr()
    summary = train.run(tiny(out, "train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=0"),
                        resume="auto")
    err = capsys.readouterr().err
    assert summary["status"] == "completed" and summary["step"] == 6
    assert f"{newest}: not a readable checkpoint" in err
    assert "resuming from step-00000002.pt, the newest checkpoint that can be resumed, not step-00000004.pt" in err
    assert f"--resume {out / 'checkpoints' / 'step-00000002.pt'}" in err


def test_resume_from_a_checkpoint_that_cannot_continue_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    train.run(tiny(out, "train.max_steps=2"))
    path = latest_checkpoint(out)
    ckpt = torch.load(path, weights_only=True)
    for key, change, message in [
        ("optimizer", None, "holds no optimizer state, so training cannot continue from it"),
        ("model", lambda m: {k: (v[:1] if k == "head.weight" else v) for k, v in m.items()}, "wrong shape: head.weight"),
    ]:
        broken = dict(ckpt, **{key: change(ckpt[key]) if change else None})
        torch.save(broken, tmp_path / "broken.pt")
        with pytest.raises(CheckpointError, match=message):
            train.run(tiny(tmp_path / f"new-{key}", "train.max_steps=3"), resume=tmp_path / "broken.pt")


def test_a_full_disk_at_any_write_of_a_resume_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    """Each write a resumed run makes (config.toml, metrics rows, curves.png, the sample grid,
    the checkpoint) fails in turn with ENOSPC: the run exits 1 with one line, and the directory is
    byte for byte what it was, with no row or file of a step whose checkpoint was never written.
    A failure that training rides over (curves.png) leaves a completed run. Then a resume of the
    disk that failed at the checkpoint equals an uninterrupted one."""
    import errno
    import hashlib
    import shutil
    from contextlib import contextmanager

    import imagetx.system.atomic as atomic
    from imagetx.training.rundir import RunDir
    from typer.testing import CliRunner

    from imagetx.cli import app

    extra = ["train.eval_every=2", "train.eval_images=4", "train.sample_every=2", "train.sample_count=2",
             "train.checkpoint_every=0"]
    template = tmp_path / "template"
    train.run(tiny(template, "train.max_steps=2", *extra))
    args = ["train", "--out", None, "--resume", "auto", "--device", "cpu", "--max-steps", "4",
            *[a for s in [*TINY, *extra] for a in ("--set", s)]]

    def snapshot(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}

    before = snapshot(template)
    writes, fail_at = [0], [0]

    def count(what):
        writes[0] += 1
        if writes[0] == fail_at[0]:
            raise OSError(errno.ENOSPC, "No space left on device", what)

    original_path, original_open = atomic.atomic_path, RunDir._open_metrics

    @contextmanager
    def failing_path(path):
        with original_path(path) as tmp:
            yield tmp
            count(str(path))  # after the data went to the temporary: as a full disk fails at fsync

    class FullDiskFile:  # metrics.jsonl, whose rows are appended
        def __init__(self, f):
            self.f = f

        def write(self, text):
            count("metrics.jsonl")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def failing_open(self, resumed_step):
        original_open(self, resumed_step)
        self.metrics = FullDiskFile(self.metrics)

    monkeypatch.setattr(atomic, "atomic_path", failing_path)
    monkeypatch.setattr(RunDir, "_open_metrics", failing_open)
    runner = CliRunner()
    reference = tmp_path / "reference"
    shutil.copytree(template, reference)
    writes[0], fail_at[0] = 0, 0
    assert runner.invoke(app, [a if a is not None else str(reference) for a in args]).exit_code == 0
    total = writes[0]
    assert total >= 6, total  # config.toml, 3 rows, curves.png, the grid, the checkpoint
    outcomes = []
    for k in range(1, total + 1):
        out = tmp_path / f"fail-{k}"
        shutil.copytree(template, out)
        writes[0], fail_at[0] = 0, k
        result = runner.invoke(app, [a if a is not None else str(out) for a in args])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert "Traceback" not in result.output, result.output
        if result.exit_code == 0:  # curves.png could not be drawn: a warning, and training went on
            assert "could not draw" in result.stderr and (out / "checkpoints" / "step-00000004.pt").exists()
            outcomes.append("completed")
            continue
        assert result.exit_code == 1 and len(errors) == 1 and "No space left on device" in errors[0], result.stderr
        assert snapshot(out) == before, (k, result.stderr)
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name or ".committed-" in p.name]
        outcomes.append("unchanged")
        if k < total:  # unchanged, the next resume is the uninterrupted one: shown once, for the last write
            continue
        fail_at[0] = 0  # the disk has room again: the resume ends where the uninterrupted one did
        assert runner.invoke(app, [a if a is not None else str(out) for a in args]).exit_code == 0
        done, ref = torch.load(out / "checkpoints" / "step-00000004.pt"), torch.load(reference / "checkpoints" / "step-00000004.pt")
        assert all(torch.equal(done["model"][n], ref["model"][n]) for n in ref["model"])
        assert curve(out) == curve(reference) and sorted(snapshot(out)) == sorted(snapshot(reference))
    assert outcomes.count("unchanged") >= total - 1, outcomes
