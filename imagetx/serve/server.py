"""`imagetx serve`: load the models once and serve the page and its API with uvicorn."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from imagetx import console
from imagetx.errors import ConfigError, RunError, raise_problems
from imagetx.serve.jobs import QUEUE

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# module -> the package that provides it (the `serve` extra of pyproject.toml)
NEEDS = {"starlette": "starlette", "uvicorn": "uvicorn", "multipart": "python-multipart"}


@dataclass
class ServeConfig:
    """What `imagetx serve` does: which models, where it listens, on which device."""

    models: list[str] = field(default_factory=list)  # run directories, checkpoints, export folders, pretrained names
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    precision: str = "auto"  # sampling: "auto" (bf16 where native), "fp32" or "bf16"; likelihoods stay fp32
    queue: int = QUEUE  # requests running or waiting; more are refused with 503

    def problems(self) -> list[str]:
        from imagetx.system.distributed import device_problems
        from imagetx.system.precision import precision_problems

        p = [] if self.models else ["give at least one MODEL (a run directory, checkpoint, export folder or pretrained name)"]
        if not 1 <= self.port <= 65535:
            p.append(f"--port must be in [1, 65535], got {self.port}")
        if self.queue < 1:
            p.append(f"--queue must be >= 1, got {self.queue}")
        return p + device_problems(self.device) + precision_problems(self.precision)


def missing_packages() -> list[str]:
    """The packages of the `serve` extra that are not installed."""
    return [package for module, package in NEEDS.items() if importlib.util.find_spec(module) is None]


def check_packages() -> None:
    missing = missing_packages()
    if missing:
        raise RunError(f"imagetx serve needs {', '.join(missing)}: pip install 'imagetx[serve]'")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def prepare(config: ServeConfig):
    """Check the config, load the models and build the app -> (app, {name: ServedModel}).
    Raises ConfigError (usage), RunError (a missing package) or CheckpointError."""
    check_packages()
    raise_problems(config.problems())
    from imagetx.serve.app import build_app
    from imagetx.serve.models import load_models
    from imagetx.system.distributed import select_device
    from imagetx.system.precision import resolve

    device = select_device(config.device)
    precision = resolve(config.precision, device)
    models = load_models(config.models, device, precision)
    return build_app(models, config.queue), models


def run(config: ServeConfig) -> None:
    """Serve until Ctrl-C. A host other than the loopback one gets a warning: there is no
    authentication."""
    if not isinstance(config.port, int):
        raise ConfigError([f"--port must be an integer, got {config.port!r}"])
    app, models = prepare(config)
    import uvicorn

    if not is_loopback(config.host):
        console.warn(f"--host {config.host}: the server has no authentication; anyone who can reach this address "
                     "can use it and its processor")
    for model in models.values():
        console.note(f"serving {model.name} ({model.info['kind']}, {model.precision.name}) from {model.spec}")
    shown = f"[{config.host}]" if ":" in config.host else config.host
    console.note(f"open http://{shown}:{config.port}/ (Ctrl-C stops the server)")
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
