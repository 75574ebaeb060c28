"""The web app: the page, and the HTTP API it uses (docs/serve.md documents every endpoint).

Every failure a request can cause is a JSON {"error": "..."} with a 4xx status (503 when the
queue is full); a bug is a 500 with one line, its traceback on the server's stderr, and the
server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import traceback
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from imagetx.errors import ConfigError, RunError
from imagetx.serve import work
from imagetx.serve.jobs import QUEUE, Busy, Cancelled, Jobs, stream_events
from imagetx.serve.models import ServedModel
from imagetx.serve.requests import MAX_BODY_BYTES, BadRequest, kept_mask, parse, read_image_upload
from imagetx.storage.images import png_bytes

STATIC = Path(__file__).resolve().parent / "static"

SAMPLE_FIELDS = ("model", "n", "temperature", "seed", "label", "decode")
COMPLETE_FIELDS = SAMPLE_FIELDS + ("rows",)
SUPERRES_FIELDS = ("model", "n", "temperature", "seed", "label", "decode", "consistent")
LIKELIHOOD_FIELDS = ("model", "label")


def describe_error(exc: BaseException) -> tuple[int, str]:
    """An exception -> (HTTP status, its one-line message)."""
    if isinstance(exc, BadRequest):
        return exc.status, exc.message
    if isinstance(exc, Busy):
        return 503, str(exc)
    if isinstance(exc, ConfigError):
        return 422, "; ".join(p.replace("--", "") for p in exc.problems)
    if isinstance(exc, RunError):
        return 422, str(exc)
    if isinstance(exc, Cancelled):
        return 499, "the client went away"
    if isinstance(exc, HTTPException):  # Starlette's own, e.g. a malformed request
        return exc.status_code, str(exc.detail)
    traceback.print_exception(exc)
    return 500, f"internal error ({type(exc).__name__}: {exc}); the server keeps serving, please report it"


def error_response(exc: BaseException) -> JSONResponse:
    status, message = describe_error(exc)
    return JSONResponse({"error": message}, status_code=status, headers={"Retry-After": "2"} if status == 503 else None)


async def _json_body(request: Request) -> dict:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(413, f"the request is larger than {MAX_BODY_BYTES} bytes")
    try:
        raw = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"the body is not JSON ({exc}); send e.g. {{\"model\": \"shapes\", \"n\": 4}}") from None
    if not isinstance(raw, dict):
        raise BadRequest(400, "the body must be a JSON object, e.g. {\"model\": \"shapes\", \"n\": 4}")
    return raw


async def _form(request: Request) -> tuple[dict, dict]:
    """A multipart request -> (its text fields, {field: (bytes, file name)} of its files)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest(415, "send the image as multipart/form-data, e.g. curl -F image=@photo.png")
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise BadRequest(411, "the request needs a Content-Length")
    if int(length) > MAX_BODY_BYTES:
        raise BadRequest(413, f"the request is larger than {MAX_BODY_BYTES} bytes")
    try:
        form = await request.form(max_files=2, max_fields=16)
    except HTTPException as exc:
        raise BadRequest(400, f"the form cannot be read: {exc.detail}") from None
    fields, files = {}, {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            fields[key] = value
        else:
            files[key] = (await value.read(MAX_BODY_BYTES + 1), value.filename or key)
    unknown = sorted(k for k in files if k not in ("image", "mask"))
    if unknown:
        raise BadRequest(422, f"unknown file field(s) {', '.join(unknown)}; send image (and for /api/complete, mask)")
    return fields, files


def _image(files: dict, key: str, served: ServedModel, size, notes: list[str]):
    if key not in files:
        raise BadRequest(422, f"no {key}: send it as a file field, e.g. curl -F {key}=@picture.png")
    data, name = files[key]
    channels = 1 if key == "mask" else served.config.channels
    return read_image_upload(data, name, channels, size, notes)


class Server:
    """The app's state: the models (loaded once) and the queue."""

    def __init__(self, models: dict[str, ServedModel], queue: int = QUEUE):
        self.models, self.jobs = models, Jobs(queue)

    # -- reading requests into (job function, its arguments) --------------------------------------
    async def sample_request(self, request: Request):
        served, v = parse(await _json_body(request), SAMPLE_FIELDS, self.models, superres=False)
        return work.sample, (served, v["n"], v["temperature"], v["seed"], v["label"], v["decode"]), []

    async def complete_request(self, request: Request):
        fields, files = await _form(request)
        served, v = parse(fields, COMPLETE_FIELDS, self.models, superres=False, form=True)
        notes: list[str] = []
        image = _image(files, "image", served, served.config.image_size, notes)
        mask = _image(files, "mask", served, served.config.image_size, notes) if "mask" in files else None
        if mask is not None and v["rows"] is not None:
            raise BadRequest(422, "give rows or a mask, not both")
        kept = kept_mask(v, mask, tuple(image.shape))
        return work.sample, (served, v["n"], v["temperature"], v["seed"], v["label"], v["decode"], image, kept), notes

    async def superres_request(self, request: Request):
        fields, files = await _form(request)
        served, v = parse({"temperature": "0.9", **fields}, SUPERRES_FIELDS, self.models, superres=True,
                          label_required=True, form=True)
        notes: list[str] = []
        source = _image(files, "image", served, served.config.source_size, notes)
        return work.superres, (served, source, v["n"], v["temperature"], v["seed"], v["label"], v["decode"],
                               v["consistent"]), notes

    async def likelihood_request(self, request: Request):
        from imagetx.data.transforms import area_downsample
        from imagetx.model.consistency import factors

        fields, files = await _form(request)
        served, v = parse(fields, LIKELIHOOD_FIELDS, self.models, superres=None, label_required=True, form=True)
        cfg, notes = served.config, []
        image = _image(files, "image", served, cfg.image_size, notes)
        source = None
        if cfg.source_size is not None:  # scored given its own area-downsampled version, as trained
            if factors(cfg.image_size, cfg.source_size) is None:
                raise BadRequest(422, f"model {served.name!r} does not make its input by area downsampling; "
                                 "its likelihood needs the input image too")
            source = area_downsample(image[None], cfg.source_size)[0]
        return work.likelihood, (served, image, v["label"], source), notes

    # -- running them ---------------------------------------------------------------------------
    async def plain(self, request: Request, reader, answer: str = "png") -> Response:
        """Run a request and answer with its picture as a PNG (answer "png") or its summary as
        JSON (answer "json"); cancel it when the client disconnects while it waits or runs."""
        try:
            fn, args, notes = await reader(request)
            job = self.jobs.admit()
        except Exception as exc:  # every failure is a JSON answer
            return error_response(exc)
        future = self.jobs.submit(job, fn, *args)
        while not future.done():
            await asyncio.wait({future}, timeout=0.25)
            if not future.done() and await request.is_disconnected():
                job.cancel()
        try:
            outcome = future.result()
        except Exception as exc:
            return error_response(exc)
        if answer == "json":
            return JSONResponse({**outcome.summary, "notes": notes})
        headers = {"X-Imagetx-Bpd": ",".join(str(b) for b in outcome.summary["bpd"])}
        if "consistency" in outcome.summary:
            headers["X-Imagetx-Consistency"] = ",".join(str(c) for c in outcome.summary["consistency"])
        return Response(png_bytes(outcome.picture), media_type="image/png", headers=headers)

    async def streamed(self, request: Request, reader) -> Response:
        """Run a request and answer with server-sent events: `notes`, `frame`s, then `result`
        or `error`; the job stops when the client disconnects."""
        try:
            fn, args, notes = await reader(request)
            job = self.jobs.admit()
        except Exception as exc:  # every failure is a JSON answer
            return error_response(exc)

        async def events():
            yield f"event: notes\ndata: {json.dumps({'notes': notes})}\n\n".encode()
            async for chunk in stream_events(self.jobs, job, lambda j, *a: fn(j, *a).summary, args, describe_error):
                yield chunk

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def app(self) -> Starlette:
        def plain(reader, answer="png"):
            async def endpoint(request):
                return await self.plain(request, reader, answer)
            return endpoint

        def streamed(reader):
            async def endpoint(request):
                return await self.streamed(request, reader)
            return endpoint

        async def index(request):
            return FileResponse(STATIC / "index.html")

        async def models(request):
            return JSONResponse([m.info for m in self.models.values()])

        async def status(request):
            return JSONResponse(self.jobs.status())

        async def http_error(request, exc: HTTPException):
            return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"}, status_code=exc.status_code)

        routes = [
            Route("/", index),
            Route("/api/models", models),
            Route("/api/status", status),
            Route("/api/sample", plain(self.sample_request), methods=["POST"]),
            Route("/api/sample/stream", streamed(self.sample_request), methods=["POST"]),
            Route("/api/complete", plain(self.complete_request), methods=["POST"]),
            Route("/api/complete/stream", streamed(self.complete_request), methods=["POST"]),
            Route("/api/superres", plain(self.superres_request), methods=["POST"]),
            Route("/api/superres/stream", streamed(self.superres_request), methods=["POST"]),
            Route("/api/likelihood", plain(self.likelihood_request, "json"), methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC)),
        ]
        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            self.jobs.shutdown()

        # the body limits are checked by _json_body and _form, which answer in JSON
        return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def build_app(models: dict[str, ServedModel], queue: int = QUEUE) -> Starlette:
    """The ASGI app serving `models` (imagetx.serve.models.load_models) with a queue bound."""
    return Server(models, queue).app()
