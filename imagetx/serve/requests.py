"""A request's parameters and uploads, checked before any work: each problem is one line, and
all of them come back together in a 4xx JSON message. The values are checked by the same
functions as the CLI's flags (imagetx.checks), uploaded images read by the CLI's image reader
(storage.images.decode_image, which refuses decompression bombs) and fitted to the model's size
as `imagetx superres --input` fits its files."""

from __future__ import annotations

import json

import torch

from imagetx.checks import count_problems, label_problems, seed_problems, temperature_problems
from imagetx.errors import ImageFileError
from imagetx.serve.models import MAX_COUNT, ServedModel
from imagetx.storage.images import decode_image
from imagetx.superres import fit_source

MAX_UPLOAD_BYTES = 2 * 2**20  # one uploaded image file
MAX_BODY_BYTES = 2 * MAX_UPLOAD_BYTES + 2**16  # a whole request: an image, a mask and the fields
MAX_UPLOAD_PIXELS = 2048 * 2048  # refused before decoding: the models here are small
DECODES = ("auto", "sequential", "parallel")

# every parameter a request may give, with its default; each endpoint takes some of them
DEFAULTS = {"model": None, "n": 4, "temperature": 1.0, "seed": 0, "label": None, "decode": "auto",
            "rows": None, "consistent": False}


class BadRequest(Exception):
    """A request the server will not run: `status` (4xx) and one message naming each problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _api(problems: list[str]) -> list[str]:
    """The shared checks name CLI flags (--temperature); a request names fields."""
    return [p.replace("--", "") for p in problems]


WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
KINDS = {"model": str, "n": int, "temperature": float, "seed": int, "label": int, "decode": str, "rows": int,
         "consistent": bool}


def _number(raw, kind, name: str, problems: list[str], form: bool):
    """A field's value as `kind` (int, float, bool or str): JSON gives it typed, a form as text."""
    if raw is None:
        return None
    if form and kind is not str:
        text = raw.strip().lower()
        try:
            if kind is bool:
                if text not in ("true", "false", "1", "0", "on", "off"):
                    raise ValueError(raw)
                return text in ("true", "1", "on")
            return int(text) if kind is int else float(text)
        except ValueError:
            problems.append(f"{name} must be {WORDS[kind]}, got {raw!r}")
            return None
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if (kind is bool) != isinstance(raw, bool) or not isinstance(raw, kind):
        problems.append(f"{name} must be {WORDS[kind]}, got {json.dumps(raw)}")
        return None
    return raw


def parse(raw: dict, names: tuple[str, ...], models: dict[str, ServedModel], superres: bool | None,
          label_required: bool = False, form: bool = False) -> tuple[ServedModel, dict]:
    """raw fields (a JSON object, or a form's text fields: form) -> (the model they name, every field
    in `names` with its default filled in). superres: the endpoint needs a super-resolution model
    (True), one that is not (False), or either (None). Raises BadRequest (422) listing every
    problem."""
    problems = [f"unknown field {k!r}; this endpoint takes {', '.join(names)}" for k in raw if k not in names]
    values = {k: DEFAULTS[k] for k in names}
    for k in names:
        if k in raw:
            values[k] = _number(raw[k], KINDS[k], k, problems, form)
    unreadable = {k for k in names if k in raw and raw[k] is not None and values[k] is None}
    fitting = [k for k, m in models.items() if superres is None or (m.config.source_size is not None) == superres]
    name = values["model"] if values["model"] is not None else (fitting or list(models))[0]
    served = models.get(name)
    if served is None:
        problems.append(f"model {name!r} is not served here; the models are: {', '.join(models)} (GET /api/models)")
        raise BadRequest(422, "; ".join(problems))
    cfg = served.config
    values["model"] = name
    if superres is True and cfg.source_size is None:
        problems.append(f"model {name!r} is not a super-resolution model; use /api/sample or /api/complete")
    if superres is False and cfg.source_size is not None:
        problems.append(f"model {name!r} is a super-resolution model; use /api/superres")
    if "n" in names and values["n"] is not None:
        problems += count_problems(values["n"], "n")
        if isinstance(values["n"], int) and values["n"] > MAX_COUNT:
            problems.append(f"n must be at most {MAX_COUNT} per request, got {values['n']}")
    if "temperature" in names and values["temperature"] is not None:
        problems += temperature_problems(values["temperature"])
    if "seed" in names and values["seed"] is not None:
        problems += seed_problems(values["seed"], "seed")
    if "label" in names and "label" not in unreadable:
        problems += label_problems(cfg, values["label"], required=label_required)
    if "decode" in names and values["decode"] not in DECODES:
        problems.append(f"decode must be one of {', '.join(DECODES)}, got {values['decode']!r}")
    H = cfg.image_size[0]
    if values.get("rows") is not None and not 1 <= values["rows"] < H:
        problems.append(f"rows must be in [1, {H - 1}] for this model's {H}-row images, got {values['rows']}")
    if problems:
        raise BadRequest(422, "; ".join(_api(problems)))
    return served, values


def read_image_upload(data: bytes, name: str, channels: int, size: tuple[int, int], notes: list[str]) -> torch.Tensor:
    """An uploaded file's bytes -> uint8 (h, w, channels) at `size`: the mode converted and other
    sizes centre-cropped and area-resized, each with a note. Raises BadRequest (413 for a file
    over MAX_UPLOAD_BYTES; 422 for a non-image, an image smaller than `size`, a decompression
    bomb or one over MAX_UPLOAD_PIXELS)."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise BadRequest(413, f"{name}: more than the {MAX_UPLOAD_BYTES} bytes an upload may have")
    if not data:
        raise BadRequest(422, f"{name}: the file is empty; send an image (PNG, JPEG, ...)")
    try:
        image, notices = decode_image(data, name, channels, max_pixels=MAX_UPLOAD_PIXELS)
        notes += notices
        return fit_source(image, name, size, notes.append)
    except ImageFileError as exc:
        raise BadRequest(422, str(exc)) from None


def kept_mask(values: dict, mask: torch.Tensor | None, shape: tuple[int, int, int]) -> torch.Tensor:
    """What a completion keeps, bool (H, W, C): the painted mask's light pixels (mask uint8
    (H, W, 1)), or the top `rows` rows (default half). Raises BadRequest when it keeps nothing
    or everything."""
    H, W, C = shape
    if mask is not None:
        kept = (mask[..., :1] >= 128).expand(H, W, C).clone()
        if not kept.any() or kept.all():
            raise BadRequest(422, "mask: paint (in white) some of the image to keep, not none or all of it")
        return kept
    kept = torch.zeros(H, W, C, dtype=torch.bool)
    kept[: H // 2 if values.get("rows") is None else values["rows"]] = True
    return kept
