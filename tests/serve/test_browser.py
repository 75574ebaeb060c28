"""The page of `imagetx serve` in a real browser: Playwright driving headless Chromium from the
system (Playwright's own browser download is not used). Sample and watch the canvases fill and
the progress end; upload an image to complete, to super-resolve and to measure; read the results.
Screenshots go to the test's folder, and to $IMAGETX_SCREENSHOTS when set (docs/serve.png is
the sample screenshot, taken so)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from playwright.sync_api import sync_playwright

from imagetx.data.transforms import area_downsample
from imagetx.serve.app import build_app
from support.serve import live_server, png, served

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium): "
                                "the browser tests need one")

DONE = "selector => document.querySelector(selector).textContent.startsWith('done')"
# what the page showed while it sampled: a progress bar part-way, and an image canvas painted then
WATCH = """() => {
  window.seen = {partial: false, paintedPartway: false};
  const timer = setInterval(() => {
    const p = document.querySelector('#sample-progress');
    if (p.value > 0 && p.value < p.max) {
      window.seen.partial = true;
      if (document.querySelector('#sample-results canvas.image[data-painted]')) window.seen.paintedPartway = true;
    }
    if (p.value === p.max && p.max > 1) clearInterval(timer);
  }, 5);
}"""
# every canvas under a selector painted, and not in one flat colour
PAINTED = """selector => {
  const canvases = [...document.querySelectorAll(selector)];
  return canvases.length > 0 && canvases.every(c => {
    if (!c.width || !c.height) return false;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 4; i < d.length; i += 4) if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2]) return true;
    return false;
  });
}"""


def shoot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    if os.environ.get("IMAGETX_SCREENSHOTS"):
        shutil.copy(tmp_path / name, Path(os.environ["IMAGETX_SCREENSHOTS"]) / name)


def test_the_page_samples_completes_super_resolves_and_measures(tmp_path):
    models = served("fashion-mnist", "fashion-mnist-superres", precision="auto")
    sneaker = models["fashion-mnist"].model.sample(1, labels=torch.tensor([7]), seed=3)[0]  # uint8 (28, 28, 1)
    (tmp_path / "sneaker.png").write_bytes(png(sneaker[..., 0]))
    (tmp_path / "small.png").write_bytes(png(area_downsample(sneaker[None], (7, 7))[0, ..., 0]))

    with live_server(build_app(models)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.set_default_timeout(120_000)  # a machine busy with other work samples slowly
        page.on("pageerror", lambda error: pytest.fail(f"JavaScript error: {error}"))
        page.goto(url)

        # Sample: frames fill the canvases while the progress bar moves, then it ends full
        page.select_option("#sample-form [name=model]", "fashion-mnist")
        page.fill("#sample-form [name=n]", "6")
        page.fill("#sample-form [name=seed]", "1")
        page.evaluate(WATCH)
        page.click("#sample-start")
        page.wait_for_function(DONE, arg="#sample-status")
        assert page.evaluate("() => window.seen") == {"partial": True, "paintedPartway": True}
        assert page.eval_on_selector("#sample-progress", "p => p.value === p.max && p.max === 784")
        page.wait_for_function(PAINTED, arg="#sample-results canvas")
        captions = page.locator("#sample-results figcaption").all_text_contents()
        assert len(captions) == 6 and all("bits/dim, class" in c for c in captions)
        shoot(page, tmp_path, "serve-sample.png")

        # parallel decoding: the status line shows the positions each pass accepted
        page.select_option("#sample-form [name=decode]", "parallel")
        page.fill("#sample-form [name=n]", "1")
        page.eval_on_selector("#sample-status", "e => e.textContent = ''")
        page.click("#sample-start")
        page.wait_for_function(DONE, arg="#sample-status")
        status = page.text_content("#sample-status")
        assert "parallel decoding" in status and "positions accepted per pass)" in status, status
        assert float(status.split("passes (")[1].split()[0]) > 1

        # Complete: an uploaded image, its top rows kept, several completions streamed
        page.click("nav .tab[data-tab=complete]")
        page.set_input_files("#complete-file", str(tmp_path / "sneaker.png"))
        page.wait_for_function(PAINTED, arg="#draw")
        page.fill("#complete-form [name=n]", "3")
        page.fill("#complete-rows", "14")
        page.click("#complete-start")
        page.wait_for_function(DONE, arg="#complete-status")
        page.wait_for_function(PAINTED, arg="#complete-results canvas.image")
        assert page.locator("#complete-results figure").count() == 3
        shoot(page, tmp_path, "serve-complete.png")

        # ... or the region painted on the canvas
        page.check("input[name=keep][value=mask]")
        box = page.locator("#mask").bounding_box()
        page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.3 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.8 * box["width"], box["y"] + 0.4 * box["height"], steps=12)
        page.mouse.up()
        page.eval_on_selector("#complete-status", "e => e.textContent = ''")
        page.click("#complete-start")
        page.wait_for_function(DONE, arg="#complete-status")
        assert page.locator("#complete-results figure").count() == 3

        # Super-resolve: the input and bicubic beside the samples, with their consistency
        page.click("nav .tab[data-tab=superres]")
        page.set_input_files("#superres-file", str(tmp_path / "small.png"))
        page.fill("#superres-form [name=n]", "2")
        page.click("#superres-start")
        page.wait_for_function(DONE, arg="#superres-status")
        page.wait_for_function(PAINTED, arg="#superres-results canvas")
        assert page.locator("#superres-inputs figcaption").all_text_contents() == ["input (nearest)", "bicubic"]
        captions = page.locator("#superres-results figcaption").all_text_contents()
        assert len(captions) == 2 and all("consistency 0.00 (0 = exact)" in c for c in captions)
        shoot(page, tmp_path, "serve-superres.png")

        # Likelihood: bits/dim and the surprisal map of an upload
        page.click("nav .tab[data-tab=likelihood]")
        page.select_option("#likelihood-form [name=model]", "fashion-mnist")
        page.select_option("#likelihood-form [name=label]", "7")
        page.set_input_files("#likelihood-file", str(tmp_path / "sneaker.png"))
        page.click("#likelihood-start")
        page.wait_for_function("() => document.querySelector('#likelihood-bpd').textContent.includes('bits/dim')")
        bpd = float(page.text_content("#likelihood-bpd").split()[0])
        model = models["fashion-mnist"].model
        expected = float(model.nll(sneaker[None], torch.tensor([7]))[0].detach()) / (784 * np.log(2))
        assert bpd == pytest.approx(expected, abs=1e-3)
        page.wait_for_function(PAINTED, arg="#likelihood-results canvas")
        shoot(page, tmp_path, "serve-likelihood.png")

        # a bad request shows its message on the page, and the page keeps working
        page.select_option("#likelihood-form [name=model]", "fashion-mnist-superres")
        page.set_input_files("#likelihood-file", {"name": "x.png", "mimeType": "image/png", "buffer": b"not a png"})
        page.click("#likelihood-start")
        page.wait_for_function("() => document.querySelector('#error').textContent.includes('not a readable image')")

        # closing the page while it samples stops the server's work
        page.click("nav .tab[data-tab=sample]")
        page.select_option("#sample-form [name=decode]", "sequential")
        page.fill("#sample-form [name=n]", "16")
        page.click("#sample-start")
        page.wait_for_function("() => document.querySelector('#sample-progress').value > 0")
        page.close()
        deadline = time.monotonic() + 10
        while (status := httpx.get(f"{url}/api/status").json())["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status["pending"] == 0 and status["cancelled"] == 1 and status["failed"] == 0, status
        browser.close()
