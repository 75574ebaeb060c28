"""What the tests of `imagetx serve` share: the app over packaged models, a real uvicorn server
on a free port in a thread, image files as bytes, and reading server-sent events and data URLs."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image


def served(*names: str, precision: str = "fp32"):
    """{name: ServedModel} of packaged models on the CPU."""
    from imagetx.serve.models import load_models
    from imagetx.system.precision import resolve

    return load_models(list(names), torch.device("cpu"), resolve(precision, "cpu"))


def png(array) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (H, W, C)."""
    array = np.asarray(Image.open(io.BytesIO(data)))
    return array[..., None] if array.ndim == 2 else array


def from_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,"), url[:40]
    return decode_png(base64.b64decode(url.split(",", 1)[1]))


def events(text: str) -> list[tuple[str, dict]]:
    """A server-sent event stream -> [(event, data)]."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        name = next(line[7:] for line in lines if line.startswith("event: "))
        data = "".join(line[6:] for line in lines if line.startswith("data: "))
        out.append((name, json.loads(data)))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """Serve `app` with uvicorn on 127.0.0.1 in a thread -> its base URL; stopped on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
