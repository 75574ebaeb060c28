"""train.cooldown: the learning rate's linear fall to 0 at the end of a run, planned in steps or
from the time limit, and a resumed run that repeats it exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from imagetx import train
from imagetx.config import load_config
from imagetx.errors import ConfigError
from imagetx.storage.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from imagetx.training.optim import Cooldown, lr_factor
from support.runs import TINY, tiny
from support.runs import curve, rows

fractions = st.floats(0.01, 0.95)


@given(fraction=fractions, max_steps=st.integers(1, 20_000))
def test_in_steps_the_rate_falls_linearly_over_the_last_fraction_and_stays_above_zero(fraction, max_steps):
    c = Cooldown(fraction, max_steps)
    n = c.end - c.start
    assert c.end == max_steps and n == max(round(fraction * max_steps), 1)
    assert all(c.factor(s) == 1.0 for s in range(max(c.start - 7, 1), c.start + 1))
    falling = [c.factor(s) for s in range(c.start + 1, c.end + 1)]
    assert all(0 < b < a <= 1 for a, b in zip([1.0, *falling], falling))
    steps = torch.tensor(falling, dtype=torch.float64)
    assert torch.allclose(steps.diff(), torch.full((n - 1,), -1 / (n + 1), dtype=torch.float64))
    assert c.factor(c.end) == pytest.approx(1 / (n + 1)) and c.factor(c.end + 1) == 0.0


@given(fraction=fractions, max_steps=st.integers(1, 100_000), step=st.integers(1, 100_000),
       done=st.integers(1, 100_000), elapsed=st.floats(0, 10_000), minutes=st.floats(0.01, 100))
def test_by_time_the_fall_lasts_what_the_rate_so_far_gives_and_is_planned_once(
    fraction, max_steps, step, done, elapsed, minutes
):
    c = Cooldown(fraction, max_steps)
    due = c.due_by_time(step, elapsed, minutes)
    assert due == (elapsed > (1 - fraction) * 60 * minutes and step < c.start)
    if not due:
        return
    c.plan_by_time(step, done)
    assert c.start == step and c.by_time
    assert c.end == min(max_steps, step + max(round(done * fraction / (1 - fraction)), 1))
    assert not c.due_by_time(step + 1, elapsed + 1, minutes)  # planned once, never again
    again = Cooldown(fraction, 10 * max_steps)  # a resumed run, even one whose max_steps grew
    assert again.load_state_dict(c.state_dict()) and again.state_dict() == c.state_dict()
    assert not Cooldown(fraction / 2, max_steps).load_state_dict(c.state_dict())  # another fraction: afresh


def test_a_plan_in_steps_is_not_taken_from_a_checkpoint():
    """A resumed run that raises max_steps moves the fall with it."""
    old, new = Cooldown(0.25, 100), Cooldown(0.25, 200)
    assert not new.load_state_dict(old.state_dict()) and (new.start, new.end) == (150, 200)


def test_a_run_with_a_cooldown_in_steps_logs_those_rates(tmp_path):
    summary = train.run(tiny(tmp_path / "run", "train.max_steps=20", "train.cooldown=0.25"))
    assert summary["status"] == "completed" and summary["step"] == 20
    logged = [r["lr"] for r in rows(tmp_path / "run")]
    expected = [2e-3 * lr_factor(s, "rsqrt", 3, 20) * (1 if s <= 15 else (21 - s) / 6) for s in range(1, 21)]
    assert logged == pytest.approx(expected, rel=1e-6)


class FakeClock:
    """imagetx.train's clock: one second per reading until the cooldown is due, then a quarter of
    one (the machine got faster), so that the run reaches the planned end before the limit."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1.0 if self.now < 30 else 0.25
        return self.now

    def perf_counter(self) -> float:
        return self.monotonic()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_time_planned_cooldown_ends_the_run_and_a_resumed_run_repeats_it(tmp_path, monkeypatch, precision):
    """max_minutes = 1 on a clock that reads 1 s per call: the fall begins after 30 s, lasts the
    steps the run took so far and ends the run; a run resumed from a checkpoint inside the fall
    repeats the uninterrupted one bit for bit."""
    extra = ["train.max_steps=100000", "train.max_minutes=1", "train.cooldown=0.5", "train.ema=0.8",
             f"train.precision={precision}"]
    runs = {}
    for name in ("straight", "resumed"):
        monkeypatch.setattr(train, "time", FakeClock())
        runs[name] = train.run(tiny(tmp_path / name, *extra))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    plan = load_checkpoint(latest_checkpoint(straight))["cooldown"]
    assert plan["by_time"] and plan["fraction"] == 0.5
    start, end = plan["start"], plan["end"]
    assert runs["straight"]["status"] == "completed" and runs["straight"]["step"] == end
    assert 0 < start < end and end - start == pytest.approx(start, abs=1)  # the same rate for as long again
    lrs = {r["step"]: r["lr"] for r in rows(straight)}
    assert lrs[end] == pytest.approx(2e-3 * lr_factor(end, "rsqrt", 3, 100000) / (end - start + 1))

    later = [s for s, _ in list_checkpoints(resumed) if start < s < end]
    assert later, (start, end, list_checkpoints(resumed))
    for s, path in list_checkpoints(resumed):
        if s > later[0]:
            path.unlink()
    monkeypatch.setattr(train, "time", FakeClock())
    summary = train.run(tiny(resumed, *extra), resume="auto")
    assert summary["step"] == end and curve(resumed) == curve(straight)
    a, b = load_checkpoint(latest_checkpoint(straight)), load_checkpoint(latest_checkpoint(resumed))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]) and torch.equal(a["ema"][name], b["ema"][name]), name
    assert b["cooldown"] == plan


def test_a_fraction_outside_0_1_is_a_config_error():
    for bad in ("1.0", "-0.1", "nan"):
        with pytest.raises(ConfigError, match=r"train.cooldown must be in \[0, 1\)"):
            load_config(sets=[*TINY, f"train.cooldown={bad}"]).validate()


def test_the_first_lines_say_how_the_rate_ends(tmp_path, capsys):
    train.run(tiny(tmp_path / "run", "train.max_steps=4", "train.cooldown=0.5"))
    err = capsys.readouterr().err
    assert "optimizer: adam, lr 0.002, rsqrt after 3 warmup steps, then falling linearly to 0 over the last 50%" in err
