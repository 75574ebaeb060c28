"""The HTTP API of `imagetx serve`, in process through Starlette's ASGI test client: each endpoint
gives what the library gives for the same request, and every bad request is a 4xx JSON message."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from starlette.testclient import TestClient

from imagetx.serve import work
from imagetx.serve.app import build_app
from imagetx.serve.jobs import Busy, Cancelled, Jobs
from imagetx.serve.requests import MAX_UPLOAD_BYTES
from imagetx.storage.images import display_scale, grid
from support.configs import tiny
from support.serve import decode_png, events, from_data_url, png, served

# Starlette asks for httpx2 in place of httpx in its test client; httpx works
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LN2 = math.log(2)


@pytest.fixture(scope="module")
def models():
    return served("shapes", "fashion-mnist-superres")


@pytest.fixture(scope="module")
def client(models):
    with TestClient(build_app(models)) as c:
        yield c


def shapes_image(models, seed=3, label=2) -> np.ndarray:
    """A drawn 12x12 shapes image, uint8 (H, W, 3)."""
    return models["shapes"].model.sample(1, labels=torch.tensor([label]), seed=seed)[0].numpy()


def test_models_lists_the_names_and_configs(client):
    answer = client.get("/api/models").json()
    assert [m["name"] for m in answer] == ["shapes", "fashion-mnist-superres"]
    shapes, superres = answer
    assert shapes["image_size"] == [12, 12] and shapes["num_classes"] == 6 and not shapes["superres"]
    assert shapes["config"]["attention"] == "full"
    assert superres["superres"] and superres["source_size"] == [7, 7]


def test_sample_is_the_library_s_grid_of_the_same_seed(client, models):
    r = client.post("/api/sample", json={"model": "shapes", "n": 4, "seed": 5, "temperature": 0.8})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    model = models["shapes"].model
    expected = model.sample(4, labels=torch.arange(4), seed=5, temperature=0.8)
    assert np.array_equal(decode_png(r.content), grid(expected, scale=display_scale((12, 12))).numpy())
    bits = work.bits_per_subpixel(model, expected, torch.arange(4))
    nll = model.nll(expected, torch.arange(4))
    assert torch.allclose(bits.sum((1, 2, 3)) * LN2, nll, rtol=1e-4)
    header = [float(b) for b in r.headers["x-imagetx-bpd"].split(",")]
    assert header == pytest.approx((nll / (model.config.num_dims * LN2)).tolist(), abs=1e-3)
    other = client.post("/api/sample", json={"model": "shapes", "n": 4, "seed": 6, "temperature": 0.8})
    assert other.content != r.content


def test_the_stream_sends_growing_frames_then_the_images(client, models):
    r = client.post("/api/sample/stream", json={"model": "shapes", "n": 2, "seed": 1, "label": 4})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    frames = [d for e, d in got if e == "frame"]
    assert got[0][0] == "notes" and got[-1][0] == "result"
    done = [f["done"] for f in frames]
    assert done == sorted(done) and done[-1] == 432 and len(frames) >= 6  # every row or so
    result = got[-1][1]
    expected = models["shapes"].model.sample(2, labels=torch.tensor([4, 4]), seed=1)
    images = np.stack([from_data_url(u) for u in result["images"]])
    assert np.array_equal(images, expected.numpy())
    assert np.array_equal(np.stack([from_data_url(u) for u in frames[-1]["images"]]), images)
    half = from_data_url(frames[len(frames) // 2]["images"][0])
    assert not np.array_equal(half, images[0]) and (half[-1] == 0).all()  # the bottom row not drawn yet
    grey = [96, 96, 96]
    half_bits = from_data_url(frames[len(frames) // 2]["bits"][0])
    assert (half_bits[-1] == grey).all() and not (half_bits[0] == grey).all(-1).any()  # only what is drawn has bits
    heat = from_data_url(result["bits"][0])
    assert heat.shape == (12, 36, 3)  # one 12x12 panel per channel
    assert result["labels"] == [4, 4] and result["decode"] == "sequential"


def test_parallel_decoding_reports_the_positions_each_pass_accepted(client):
    body = {"model": "shapes", "n": 1, "seed": 2, "label": 0}
    sequential = events(client.post("/api/sample/stream", json={**body, "decode": "sequential"}).text)
    parallel = events(client.post("/api/sample/stream", json={**body, "decode": "parallel"}).text)
    accepted = [a for e, d in parallel if e == "frame" for a in d["accepted"]]
    assert sum(accepted) == 432 and max(accepted) > 1 and len(accepted) == parallel[-1][1]["passes"] < 432
    assert parallel[-1][1]["decode"] == "parallel"
    assert parallel[-1][1]["images"] == sequential[-1][1]["images"]  # the same image either way


BAD_SAMPLES = [
    ({"n": 0}, "n must be >= 1"),
    ({"n": 17}, "n must be at most 16"),
    ({"n": "3"}, "n must be an integer"),
    ({"n": 2.5}, "n must be an integer"),
    ({"temperature": -1}, "temperature must be a finite number >= 0"),
    ('"temperature": NaN', "temperature must be a finite number"),  # Python's JSON reads NaN and Infinity
    ('"temperature": Infinity', "temperature must be a finite number"),
    ({"seed": -1}, "seed must be an integer in [0,"),
    ({"seed": True}, "seed must be an integer"),
    ({"label": 6}, "label must be in [0, 5]"),
    ({"decode": "fast"}, "decode must be one of auto, sequential, parallel"),
    ({"model": "../imagetx/pretrained/shapes"}, "is not served here; the models are: shapes"),
    ({"model": "fashion-mnist-superres"}, "is a super-resolution model; use /api/superres"),
    ({"size": 3}, "unknown field 'size'"),
]


@pytest.mark.parametrize("body, text", BAD_SAMPLES, ids=[t for _, t in BAD_SAMPLES])
@pytest.mark.parametrize("endpoint", ["/api/sample", "/api/sample/stream"])
def test_a_bad_sample_request_is_a_422_naming_the_problem(client, endpoint, body, text):
    if isinstance(body, str):
        r = client.post(endpoint, content='{"model": "shapes", %s}' % body, headers={"content-type": "application/json"})
    else:
        r = client.post(endpoint, json={"model": "shapes", **body})
    assert r.status_code == 422 and text in r.json()["error"], r.text
    assert "Traceback" not in r.text


def test_a_body_that_is_not_a_json_object_is_a_400(client):
    for content in (b"n=3", b"[1, 2]", b"\xff\xfe"):
        r = client.post("/api/sample", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]
    huge = b'{"n": 1, "pad": "' + b"x" * (5 * 2**20) + b'"}'
    r = client.post("/api/sample", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "the request is larger than" in r.json()["error"]
    r = client.post("/api/likelihood", data={"label": "0"}, files={"image": ("a.png", huge)})
    assert r.status_code == 413 and "the request is larger than" in r.json()["error"]
    assert client.get("/api/nothing").json() == {"error": "Not Found: GET /api/nothing"}
    assert client.get("/api/sample").status_code == 405


def test_complete_keeps_the_rows_and_the_painted_region(client, models):
    image = shapes_image(models)
    r = client.post("/api/complete/stream", data={"model": "shapes", "n": "3", "rows": "5", "label": "2", "seed": "4"},
                    files={"image": ("drawing.png", png(image), "image/png")})
    result = events(r.text)[-1][1]
    completions = np.stack([from_data_url(u) for u in result["images"]])
    assert completions.shape == (3, 12, 12, 3)
    assert (completions[:, :5] == image[:5]).all()
    assert len({c.tobytes() for c in completions}) == 3  # three different completions of the same rows
    mask = np.zeros((12, 12), np.uint8)
    mask[2:9, 3:10] = 255
    r = client.post("/api/complete/stream", data={"model": "shapes", "n": "2", "label": "2"},
                    files={"image": ("a.png", png(image)), "mask": ("m.png", png(mask))})
    completions = np.stack([from_data_url(u) for u in events(r.text)[-1][1]["images"]])
    assert (completions[:, 2:9, 3:10] == image[2:9, 3:10]).all()
    plain = client.post("/api/complete", data={"model": "shapes", "n": "2", "rows": "5"}, files={"image": ("a.png", png(image))})
    assert plain.status_code == 200 and decode_png(plain.content).shape == (2 + 12 * 5 + 2, 3 * (12 * 5 + 2) + 2, 3)


def test_super_resolution_is_consistent_with_its_input(client, models):
    source = np.asarray(torch.randint(0, 256, (7, 7)), dtype=np.uint8)
    r = client.post("/api/superres/stream", data={"n": "2", "seed": "1"}, files={"image": ("low.png", png(source))})
    got = events(r.text)
    result = got[-1][1]
    assert got[-1][0] == "result" and result["model"] == "fashion-mnist-superres"
    assert result["consistency"] == [0.0, 0.0] and result["consistent"]  # a model.consistent model
    assert from_data_url(result["bicubic"]).shape == (28, 28, 1) and len(result["images"]) == 2
    plain = client.post("/api/superres", data={"n": "1", "seed": "1"}, files={"image": ("low.png", png(source))})
    assert plain.status_code == 200 and plain.headers["x-imagetx-consistency"] == "0.0"
    assert decode_png(plain.content).shape == (2 + 28 * 2 + 2, 3 * (28 * 2 + 2) + 2, 1)  # nearest, bicubic, the sample
    # another sized input is fitted, with a note; a smaller one is refused
    big = client.post("/api/superres/stream", data={"n": "1"}, files={"image": ("big.png", png(np.zeros((14, 21), np.uint8)))})
    assert "area-resized to the model's 7x7" in events(big.text)[0][1]["notes"][0]
    small = client.post("/api/superres", files={"image": ("s.png", png(np.zeros((5, 7), np.uint8)))})
    assert small.status_code == 422 and "smaller than the model's 7x7" in small.json()["error"]


def test_likelihood_is_the_model_s_bits_per_dim(client, models):
    image = shapes_image(models, label=1)
    r = client.post("/api/likelihood", data={"model": "shapes", "label": "1"}, files={"image": ("x.png", png(image))})
    answer = r.json()
    model = models["shapes"].model
    nll = model.nll(torch.from_numpy(image)[None], torch.tensor([1]))[0].detach()
    assert answer["bpd"] == pytest.approx(float(nll) / (432 * LN2), abs=1e-4)
    surprisal = from_data_url(answer["surprisal"])
    assert surprisal.shape == (12, 36, 3) and len(np.unique(surprisal.reshape(-1, 3), axis=0)) > 1
    noise = np.asarray(torch.randint(0, 256, (12, 12, 3)), dtype=np.uint8)
    worse = client.post("/api/likelihood", data={"model": "shapes", "label": "1"}, files={"image": ("n.png", png(noise))})
    assert worse.json()["bpd"] > answer["bpd"] + 1
    r = client.post("/api/likelihood", data={"model": "shapes"}, files={"image": ("x.png", png(image))})
    assert r.status_code == 422 and "class-conditional: give label in [0, 5]" in r.json()["error"]


def test_bad_uploads_are_refused_with_a_message(client):
    def post(files, data=None, endpoint="/api/likelihood"):
        return client.post(endpoint, data={"model": "shapes", "label": "0", **(data or {})}, files=files)

    cases = [
        (post({"image": ("x.png", b"not an image at all")}), 422, "x.png: not a readable image"),
        (post({"image": ("x.png", b"")}), 422, "the file is empty"),
        (post({"image": ("big.png", b"\0" * (MAX_UPLOAD_BYTES + 1))}), 413, "more than the"),
        (post({"image": ("wide.png", png(np.zeros((2100, 2100), np.uint8)))}), 422, "is more than the 4194304 pixels"),
        (post({"image": ("s.png", png(np.zeros((4, 4, 3), np.uint8)))}), 422, "smaller than the model's 12x12"),
        (post({"photo": ("x.png", png(np.zeros((12, 12, 3), np.uint8)))}), 422, "unknown file field(s) photo"),
        (post({"mask": ("m.png", png(np.zeros((12, 12), np.uint8)))}), 422, "no image: send it as a file field"),
        (post({"image": ("x.png", png(np.zeros((12, 12, 3), np.uint8)))}, {"label": "two"}), 422,
         "label must be an integer, got 'two'"),
        (post({"image": ("x.png", png(np.zeros((12, 12, 3), np.uint8)))}, {"rows": "20"}, "/api/complete"), 422,
         "rows must be in [1, 11]"),
        (post({"image": ("x.png", png(np.zeros((12, 12, 3), np.uint8))), "mask": ("m.png", png(np.zeros((12, 12), np.uint8)))},
              {}, "/api/complete"), 422, "mask: paint (in white) some of the image"),
        (post({"image": ("x.png", png(np.zeros((12, 12, 3), np.uint8)))}, {}, "/api/superres"), 422,
         "'shapes' is not a super-resolution model"),
        (client.post("/api/likelihood", json={"model": "shapes"}), 415, "multipart/form-data"),
    ]
    for r, status, text in cases:
        assert r.status_code == status and text in r.json()["error"], (status, r.status_code, r.text)
    assert client.get("/api/models").status_code == 200  # still serving


def test_a_bug_is_a_500_in_one_line_and_the_server_keeps_serving(client, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("deliberate")

    monkeypatch.setattr(work, "sample", broken)
    r = client.post("/api/sample", json={"model": "shapes", "n": 1})
    assert r.status_code == 500 and r.json()["error"].startswith("internal error (RuntimeError: deliberate)")
    stream = events(client.post("/api/sample/stream", json={"model": "shapes", "n": 1}).text)
    assert stream[-1] == ("error", {"error": r.json()["error"], "status": 500})
    monkeypatch.undo()
    assert client.post("/api/sample", json={"model": "shapes", "n": 1}).status_code == 200


def test_the_queue_refuses_beyond_its_bound_and_counts_cancellations():
    import asyncio

    jobs = Jobs(2)
    first, second = jobs.admit(), jobs.admit()
    with pytest.raises(Busy, match="the server is busy: 2 requests"):
        jobs.admit()
    second.cancel()

    async def run():
        ran = []
        a = jobs.submit(first, lambda job: ran.append("first") or "ok")
        b = jobs.submit(second, lambda job: ran.append("second"))
        assert await a == "ok"
        with pytest.raises(Cancelled):
            await b
        return ran

    assert asyncio.run(run()) == ["first"]  # the cancelled one never ran
    assert jobs.status() == {"pending": 0, "bound": 2, "admitted": 2, "done": 1, "cancelled": 1, "failed": 0, "refused": 1}
    jobs.admit()  # room again
    jobs.shutdown()


def test_the_heat_map_colours_bits_and_greys_what_is_not_drawn():
    bits = torch.tensor([[[0.0], [8.0]], [[100.0], [float("inf")]]])  # (2, 2, 1)
    known = torch.tensor([[[True], [True]], [[True], [False]]])
    rgb = work.heat_map(bits, known)
    assert rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == work._PALETTE[0].tolist() and rgb[0, 1].tolist() == work._PALETTE[255].tolist()
    assert rgb[1, 0].tolist() == work._PALETTE[255].tolist() and rgb[1, 1].tolist() == [96, 96, 96]


@pytest.mark.parametrize("attention, output", [("local2d", "categorical"), ("local1d", "dmol")])
def test_the_bits_of_every_sub_pixel_sum_to_the_model_s_likelihood(attention, output):
    """Whatever the pattern and output (a DMOL pixel's bits are shared by its channels), and the
    mask of what is drawn follows the generation order (block-raster for local 2D)."""
    from imagetx.model.transformer import ImageTransformer

    torch.manual_seed(0)
    model = ImageTransformer(tiny(attention, output, image_size=(4, 6))).eval()
    x = torch.randint(0, 256, (2, 4, 6, 3))
    bits = work.bits_per_subpixel(model, x)
    assert bits.shape == (2, 4, 6, 3) and (bits >= 0).all()
    assert torch.allclose(bits.sum((1, 2, 3)) * LN2, model.nll(x).detach(), rtol=1e-4)
    order = model.layout.order.tolist()  # generation step -> grid position
    k = len(order) // 2
    known = work.decided(model, k)  # (H, W, C); a DMOL position is a whole pixel
    known = known[..., 0].reshape(-1) if output == "dmol" else known.reshape(-1)
    assert known.nonzero().flatten().tolist() == sorted(order[:k])
