"""`imagetx serve` over real HTTP (uvicorn on a free port): a client that disconnects stops its
work, and 20 concurrent clients are each answered or refused with 503 while memory stays bounded."""

from __future__ import annotations

import threading
import time

import pytest

import httpx

from imagetx.serve.app import build_app
from support.serve import live_server, resident_bytes, served


@pytest.fixture(scope="module")
def models():
    return served("shapes", "fashion-mnist")


def wait_idle(url: str, seconds: float = 10) -> dict:
    deadline = time.monotonic() + seconds
    while (status := httpx.get(f"{url}/api/status").json())["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


def test_a_client_that_disconnects_stops_its_work(models):
    with live_server(build_app(models)) as url:
        body = {"model": "fashion-mnist", "n": 16, "decode": "sequential"}  # seconds of work
        with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/api/sample/stream", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("event: frame"):
                    break  # and close the connection, as a closed page does
        left = time.monotonic()
        status = wait_idle(url)
        assert status["pending"] == 0 and time.monotonic() - left < 5  # the job alone takes longer
        assert status["cancelled"] == 1 and status["done"] == 0  # stopped mid-way, not finished
        with pytest.raises(httpx.ReadTimeout):  # a plain request abandoned while it runs
            httpx.post(f"{url}/api/sample", json=body, timeout=0.5)
        status = wait_idle(url)
        assert status["cancelled"] == 2 and status["done"] == 0
        assert httpx.post(f"{url}/api/sample", json={"model": "shapes", "n": 1}).status_code == 200


def test_twenty_concurrent_clients_are_answered_or_refused(models):
    """20 clients for 4 s on the shapes model, queue bound 4: every request gets a PNG or a 503
    with a message; the server is still up and idle after, and memory stays bounded."""
    statuses, problems = [], []
    with live_server(build_app(models, queue=4)) as url:
        httpx.post(f"{url}/api/sample", json={"model": "shapes", "n": 2})  # warm up before measuring memory
        before = resident_bytes()
        deadline = time.monotonic() + 4

        def client(i: int):
            with httpx.Client(timeout=60) as c:
                k = 0
                while time.monotonic() < deadline:
                    streamed = (i + k) % 3 == 0
                    path = "/api/sample/stream" if streamed else "/api/sample"
                    r = c.post(f"{url}{path}", json={"model": "shapes", "n": 1 + k % 4, "seed": 100 * i + k})
                    statuses.append(r.status_code)
                    if r.status_code == 503:
                        if "the server is busy" not in r.json()["error"] or "retry-after" not in r.headers:
                            problems.append(r.text)
                        time.sleep(0.2)  # a client backs off when refused (the server says when: Retry-After)
                    elif r.status_code != 200 or ("event: result" not in r.text if streamed else r.content[:4] != b"\x89PNG"):
                        problems.append(f"{r.status_code} {r.text[:200]}")
                    k += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert not problems, problems[:3]
        # served under the load, and refused beyond the bound (a busy machine serves fewer)
        assert statuses.count(200) >= 2 and statuses.count(503) >= 2, (statuses.count(200), statuses.count(503))
        status = wait_idle(url)
        assert status["pending"] == 0 and status["failed"] == 0 and status["refused"] == statuses.count(503)
        assert httpx.get(f"{url}/api/models").status_code == 200
        grown = resident_bytes() - before
        assert grown < 300 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB"
