"""The `imagetx serve` command: its one-line errors, the warning for a public host, and the whole
thing from the console script, answering curl-like requests."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from imagetx.serve import server
from support.cli import invoke, one_error_line
from support.serve import free_port


@pytest.fixture
def no_listening(monkeypatch):
    """uvicorn.run recorded instead of run: the command returns once the app is built."""
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    return calls


def test_a_missing_package_names_the_extra_to_install(monkeypatch):
    real = server.importlib.util.find_spec
    monkeypatch.setattr(server.importlib.util, "find_spec", lambda name: None if name == "uvicorn" else real(name))
    one_error_line(invoke("serve", "shapes"), 1, "imagetx serve needs uvicorn: pip install 'imagetx[serve]'")


def test_usage_errors_and_unknown_models_are_one_line(no_listening):
    one_error_line(invoke("serve", "shapes", "--port", "0", "--queue", "0"), 2,
                   "--port must be in [1, 65535], got 0; --queue must be >= 1, got 0")
    one_error_line(invoke("serve", "no-such-model"), 1, "no-such-model: no such checkpoint, run directory or pretrained model")
    assert no_listening == []


def test_only_the_loopback_host_goes_without_a_warning(no_listening):
    result = invoke("serve", "shapes", "--device", "cpu")
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert no_listening[-1] == {"host": "127.0.0.1", "port": 8000, "log_level": "warning"}
    result = invoke("serve", "shapes", "--host", "0.0.0.0", "--port", "8123", "--device", "cpu")
    assert result.exit_code == 0
    assert "warning: --host 0.0.0.0: the server has no authentication" in result.stderr
    assert no_listening[-1]["host"] == "0.0.0.0" and no_listening[-1]["port"] == 8123


def test_the_console_script_serves_until_ctrl_c():
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imagetx.cli", "serve", "shapes", "--port", str(port), "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/api/models").json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else ""
                time.sleep(0.2)
        assert [m["name"] for m in models] == ["shapes"]
        r = httpx.post(f"http://127.0.0.1:{port}/api/sample", json={"model": "shapes", "n": 4, "label": 3}, timeout=60)
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"note: open http://127.0.0.1:{port}/" in err and "Traceback" not in err


def test_each_option_reaches_serve_with_the_library_s_default():
    """The command's options are ServeConfig's fields, with its defaults (the CLI writes them out:
    it imports nothing of the server)."""
    import dataclasses
    import inspect

    from imagetx.cli import commands
    from imagetx.serve.jobs import QUEUE

    fields = {f.name: f for f in dataclasses.fields(server.ServeConfig)}
    options = inspect.signature(commands.serve).parameters
    assert set(options) == set(fields)
    for name, info in options.items():
        if fields[name].default is not dataclasses.MISSING:
            assert info.default.default == fields[name].default, name
    assert server.ServeConfig().queue == QUEUE
