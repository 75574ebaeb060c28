"""Diagnostics and progress on stderr."""

from __future__ import annotations


def test_progress_in_a_log_is_lines_not_carriage_returns(capsys, monkeypatch):
    from imagetx import console

    monkeypatch.setattr(console.time, "monotonic", iter(range(0, 1000, 20)).__next__)  # 20 s a call
    bar = console.progress(10, "sampling", "pos")  # stderr is not a terminal under pytest
    for _ in range(10):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") >= 2
    assert all(line.startswith("note: sampling: ") for line in err.splitlines())
    assert err.splitlines()[-1].startswith("note: sampling: 10/10 pos (100%")
