"""Experiment trackers beside metrics.jsonl (which is always written): `train.logger`.

    "none"          metrics.jsonl only
    "tensorboard"   event files in RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`)
    "wandb"         a Weights & Biases run in RUN/wandb; WANDB_MODE=offline needs no network
                    (upload later with `wandb sync RUN/wandb/offline-run-*`); WANDB_PROJECT names
                    the project (default "imagetx")

They log what the progress bar shows (loss and training bits/dim, learning rate, gradient norm,
images/s), held-out bits/dim, the periodic sample grids as images and the resolved config. Only the
main process makes one; the others get `Logger`, which does nothing.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from imagetx.errors import RunError

_PACKAGES = {"tensorboard": ("tensorboard", "imagetx[tensorboard]"), "wandb": ("wandb", "imagetx[wandb]")}


def check_installed(name: str) -> None:
    """Raise RunError, one line naming the pip command, when the package a logger needs is
    missing (before a run starts, on every process)."""
    if name not in _PACKAGES:
        return
    module, extra = _PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise RunError(f'train.logger = "{name}" needs the {module} package: pip install \'{extra}\'')


def read_rgb(path: Path) -> np.ndarray:
    """A PNG the run wrote -> uint8 (H, W, 3)."""
    from imagetx.storage.images import read_image

    return read_image(path, channels=3)[0].numpy()


class Logger:
    """train.logger = "none": every call does nothing."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def image(self, tag: str, step: int, path: Path) -> None:
        """Log the PNG at `path` (a sample grid the run wrote)."""

    def close(self) -> None:
        pass


class TensorBoardLogger(Logger):
    def __init__(self, run_dir: Path, config_toml: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        # as a code block, so TensorBoard's Markdown keeps the TOML's lines
        self.writer.add_text("config", "    " + config_toml.replace("\n", "\n    "), 0)

    def scalars(self, step, values):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def image(self, tag, step, path):
        self.writer.add_image(tag, read_rgb(path), step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbLogger(Logger):
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        # a resumed training run is a new W&B run: its steps continue from the checkpoint's
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "imagetx"), name=run_dir.name,
                              dir=str(run_dir), config=config)

    def scalars(self, step, values):
        self.run.log(values, step=step)

    def image(self, tag, step, path):
        self.run.log({tag: self.wandb.Image(read_rgb(path))}, step=step)

    def close(self):
        self.run.finish()


def make_logger(name: str, run_dir: str | os.PathLike, config) -> Logger:
    """The logger train.logger names, for the main process. config: the resolved RunConfig."""
    check_installed(name)
    run_dir = Path(run_dir)
    if name == "tensorboard":
        return TensorBoardLogger(run_dir, config.to_toml())
    if name == "wandb":
        return WandbLogger(run_dir, config.to_dict())
    return Logger()
