"""Layered TOML configuration, whatever the schema: read a file, parse `--set section.key=value`,
merge layers (defaults < base < file < flags < sets) naming unknown keys with a suggestion, and
check each value against a dataclass field's type. imagetx.config applies it to RunConfig.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import tomli_w

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from imagetx.errors import ConfigError


# ---- reading and merging ------------------------------------------------------------------------
def read_toml(path: str | os.PathLike) -> dict:
    """Read a TOML file; a missing or malformed file raises ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist"]) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file {path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config file {path} is not valid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8"]) from None


def parse_set(item: str) -> tuple[str, Any]:
    """`section.key=value` -> ("section.key", value). The value is read as a TOML literal
    (`8`, `1e-3`, `true`, `[16, 16]`, `"x"`) and otherwise taken as a plain string (`cuda:1`)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or key.count(".") != 1 or not all(key.split(".")):
        raise ConfigError([f"--set expects section.key=value (e.g. train.lr=1e-3), got {item!r}"])
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def layers_from(path: str | os.PathLike | None, flags: Mapping[str, Any] | None, sets: Iterable[str]
                ) -> tuple[list[tuple[str, Mapping]], list[str]]:
    """The (source, nested dict) layers, lowest first: the TOML file at `path`, `flags`
    ({"section.key": value}; None values ignored), `sets` ("section.key=value" strings) -> (layers,
    problems with the sets). A missing or malformed file raises ConfigError."""
    layers: list[tuple[str, Mapping]] = []
    if path is not None:
        layers.append((str(path), read_toml(path)))
    nested: dict[str, dict] = {}
    for key, value in (flags or {}).items():
        if value is not None:
            section, name = key.split(".")
            nested.setdefault(section, {})[name] = value
    if nested:
        layers.append(("command-line flags", nested))
    problems: list[str] = []
    set_layer: dict[str, dict] = {}
    for item in sets:
        try:
            key, value = parse_set(item)
        except ConfigError as exc:
            problems += exc.problems
            continue
        section, name = key.split(".")
        set_layer.setdefault(section, {})[name] = value
    if set_layer:
        layers.append(("--set", set_layer))
    return layers, problems


def merge_layers(
    defaults: Mapping[str, Mapping], layers: list[tuple[str, Mapping]], base: Mapping | None = None
) -> tuple[dict[str, dict], set[str], list[str]]:
    """Merge (source, nested dict) layers, later over earlier, over `defaults` ({section: {key:
    value}}) and `base` (below the layers; its keys do not count as given) -> (merged, the
    "section.key"s the layers give, problems: unknown sections and keys, with a suggestion)."""
    merged = {section: dict(values) for section, values in defaults.items()}
    explicit: set[str] = set()
    problems: list[str] = []
    given = [(source, layer, True) for source, layer in layers]
    if base is not None:
        given.insert(0, ("the checkpoint's config", base, False))
    for source, layer, counts in given:
        if not isinstance(layer, Mapping):
            problems.append(f"{source}: expected a table of sections, got {type(layer).__name__}")
            continue
        for section, values in layer.items():
            if section not in merged:
                problems.append(f"unknown section [{section}] in {source}{suggest(section, merged)}")
                continue
            if not isinstance(values, Mapping):
                problems.append(f"[{section}] in {source} must be a table, got {values!r}")
                continue
            for key, value in values.items():
                if key not in merged[section]:
                    known = merged[section]
                    problems.append(f"unknown key {section}.{key} in {source}{suggest(key, known, section)}")
                    continue
                merged[section][key] = value
                if counts:
                    explicit.add(f"{section}.{key}")
    return merged, explicit, problems


# ---- values -------------------------------------------------------------------------------------
def toml_value(v) -> str:
    """One TOML value; arrays of scalars on one line (`[16, 16]`)."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return tomli_w.dumps({"v": v})[len("v = "):].strip()


def suggest(key: str, known: Iterable[str], section: str | None = None) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    if not close:
        return ""
    return f"; did you mean {section + '.' if section else ''}{close[0]}?"


_NOUNS = {int: "integer", float: "number", str: "string", bool: "boolean"}


def describe_type(hint) -> str:
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return f"a list of {len(args)} {_NOUNS.get(args[0], 'value')}s"
    if hint is bool:
        return "true or false"
    noun = _NOUNS.get(hint, getattr(hint, "__name__", str(hint)))
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def check_type(value, hint, key: str) -> tuple[Any, str | None]:
    """-> (value converted to the field's type, None) or (None, a problem naming the key)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        for arg in args:
            if arg is not type(None):
                checked, problem = check_type(value, arg, key)
                if problem is None:
                    return checked, None
        names = " or ".join(describe_type(a) for a in args if a is not type(None))
        return None, f"{key} must be {names}, got {value!r}"
    problem = f"{key} must be {describe_type(hint)}, got {value!r}"
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return None, problem
        out = []
        for v, a in zip(value, args):
            checked, bad = check_type(v, a, key)
            if bad:
                return None, problem
            out.append(checked)
        return tuple(out), None
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"no type check for {hint!r} ({key})")
    return (value, None) if ok else (None, problem)
