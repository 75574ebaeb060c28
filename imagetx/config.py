"""The configuration of a training run: dataclasses, TOML in and out, `--set` overrides, validation,
and the configuration a checkpoint was saved with (`stored_config`, `data_config_from_checkpoint`).
Reading and merging the TOML layers, whatever the schema, is imagetx.storage.toml.

One precedence rule, lowest first: dataclass defaults < `--config FILE.toml` < explicit CLI flags
< repeated `--set section.key=value`. `RunConfig()` itself is the quickstart setup (builtin data,
12x12 RGB, a small model), so `imagetx train` with no arguments works offline.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from imagetx.checks import seed_problems
from imagetx.errors import CheckpointError, ConfigError, raise_problems
from imagetx.model.config import ModelConfig
from imagetx.storage.toml import check_type, layers_from, merge_layers, toml_value
from imagetx.system.distributed import device_problems
from imagetx.system.paths import cache_dir_problems
from imagetx.system.precision import precision_problems

TASKS = ("generate", "superres")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("rsqrt", "cosine", "constant")
LOGGERS = ("none", "tensorboard", "wandb")  # imagetx.training.loggers


def quickstart_model() -> ModelConfig:
    """The small model `imagetx train` uses without a config: 12x12 RGB shapes, one class per
    kind, full causal attention (the whole 432-sub-pixel prefix: cheaper than local blocks here)."""
    return ModelConfig(
        image_size=(12, 12),
        channels=3,
        attention="full",
        n_layers=3,
        d_model=96,
        n_heads=2,
        d_ff=384,
        dropout=0.0,
        block_length=144,
        num_classes=6,
    )


@dataclass
class DataConfig:
    """Where the images come from. The image size and channel count are the model's."""

    name: str = "builtin"  # a name from imagetx.data.DATASETS
    data_dir: str | None = None  # the data set's directory (None: the loader's default location)
    download: bool = False  # fetch through torchvision where it can
    task: str = "generate"  # "generate" (unconditional or class-conditional) or "superres"
    celeba_protocol: bool = False  # superres: crop CelebA at (40, 20) to 138x138 before resizing
    builtin_size: int | tuple[int, int] | None = None  # builtin only: render size before resizing (None: the model's)
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    eval_split: str = "test"  # split used for the periodic held-out bits/dim
    # decoded-data cache: each split decoded once, memory-mapped by every process. None: the default
    # folder ($IMAGETX_CACHE_DIR, else $XDG_CACHE_HOME/imagetx, else ~/.cache/imagetx); "off": none
    cache_dir: str | None = None

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.task not in TASKS:
            p.append(f"data.task must be one of {', '.join(TASKS)}; got {self.task!r}")
        size = self.builtin_size
        if size is not None and min((size, size) if isinstance(size, int) else size) < 8:
            p.append(f"data.builtin_size must be at least 8 (pixels), got {size!r}")
        if self.num_workers < 0:
            p.append(f"data.num_workers must be >= 0, got {self.num_workers}")
        p += cache_dir_problems(self.cache_dir)
        from imagetx.data import DATASETS

        if self.name not in DATASETS:
            p.append(f"data.name must be one of {', '.join(DATASETS)}; got {self.name!r}")
        return p


@dataclass
class TrainConfig:
    """Optimisation, precision, logging and checkpointing of `imagetx train`."""

    out: str = "runs/quickstart"  # run directory: config.toml, metrics.jsonl, checkpoints/, samples/
    device: str = "auto"  # "auto" (CUDA if present, else CPU), "cpu", "cuda" or "cuda:N"
    seed: int = 0  # model init and data order; process r also seeds dropout with seed + r
    batch_size: int = 8  # images per process per micro-batch
    max_steps: int = 4000  # optimizer steps
    max_minutes: float = 9.5  # stop cleanly with a checkpoint after this long (0: no limit)
    optimizer: str = "adam"  # "adam" (as published) or "adamw"
    lr: float = 2e-3  # peak learning rate, reached at the end of the warmup
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    schedule: str = "rsqrt"  # "rsqrt" (linear warmup, then step^-0.5), "cosine" or "constant"
    warmup_steps: int = 100
    cooldown: float = 0.0  # fraction of the run at its end over which the learning rate falls linearly to 0 (ours; 0: none); of max_minutes when that limit comes first, and the run then ends where the fall does
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    grad_accum: int = 1  # micro-batches per optimizer step
    ema: float = 0.0  # decay of an exponential moving average of the weights, which evaluations, samples and every command reading the checkpoint then use (0: none; see imagetx.training.optim.WeightAverage)
    precision: str = "auto"  # "auto" (bf16 autocast where native: GPUs from Ampere on, CPUs with AMX or AVX512-BF16), "fp32" or "bf16"
    compile: bool | str = "auto"  # torch.compile: "auto" (CUDA only), true or false
    activation_checkpointing: bool = False  # recompute activations in backward: less memory
    log_every: int = 10  # steps between metrics.jsonl rows
    eval_every: int = 1000  # steps between held-out bits/dim evaluations (0: never)
    eval_images: int = 200  # test images per evaluation (0: the whole split)
    sample_every: int = 1000  # steps between sample grids (0: never)
    sample_count: int = 36  # images per sample grid
    checkpoint_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 3  # most recent checkpoints kept (0: keep all)
    logger: str = "none"  # also log to "tensorboard" (RUN/tensorboard) or "wandb" (WANDB_MODE=offline: no network); metrics.jsonl is always written

    def problems(self) -> list[str]:
        p: list[str] = []
        p += device_problems(self.device, "train.device")
        p += seed_problems(self.seed, "train.seed")
        if not self.out:
            p.append("train.out must name a directory")
        for name in ("batch_size", "max_steps", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps", "eval_every", "eval_images", "sample_every", "sample_count",
            "checkpoint_every", "keep_checkpoints",
        ):
            if getattr(self, name) < 0:
                p.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_minutes", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                p.append(f"train.{name} must be >= 0, got {v}")
        if not (math.isfinite(self.cooldown) and 0.0 <= self.cooldown < 1.0):
            p.append(f"train.cooldown must be in [0, 1) (0: none; 0.2 is usual), got {self.cooldown}")
        if not (math.isfinite(self.ema) and 0.0 <= self.ema < 1.0):
            p.append(f"train.ema must be in [0, 1) (0: no moving average; 0.999 is usual), got {self.ema}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            p.append(f"train.lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            p.append(f"train.betas must both be in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            p.append(f"train.eps must be > 0, got {self.eps}")
        if self.optimizer not in OPTIMIZERS:
            p.append(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            p.append(f"train.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.logger not in LOGGERS:
            p.append(f"train.logger must be one of {', '.join(LOGGERS)}; got {self.logger!r}")
        p += precision_problems(self.precision, "train.precision")
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            p.append(f"train.compile must be true, false or \"auto\"; got {self.compile!r}")
        return p


@dataclass
class RunConfig:
    """Everything `imagetx train` needs. The defaults are the quickstart setup."""

    model: ModelConfig = field(default_factory=quickstart_model)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the "section.key"s that a config file, flag or --set gave (load_config records them); None
    # for a config built in Python, where every key counts as given. Resuming a run takes the
    # other keys, the architecture first, from the checkpoint (imagetx.training.rundir.resume_from).
    explicit: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def problems(self) -> list[str]:
        p = self.model.problems() + self.data.problems() + self.train.problems()
        superres = self.model.source_size is not None
        if self.data.task == "superres" and not superres:
            p.append('data.task is "superres" but model.source_size is not set')
        if self.data.task == "generate" and superres:
            p.append('model.source_size is set (an encoder-decoder) but data.task is not "superres"')
        if self.data.celeba_protocol and self.data.task != "superres":
            p.append('data.celeba_protocol applies only to data.task = "superres"')
        if self.data.celeba_protocol and self.model.consistent:
            p.append("model.consistent needs an input that is its target area-downsampled; data.celeba_protocol "
                     "cuts the input from the larger native image: set one of them to false")
        return p

    def validate(self) -> None:
        raise_problems(self.problems())

    def to_dict(self) -> dict:
        """Plain nested dict (lists for tuples, None kept), as stored in checkpoints."""
        out = {"model": self.model.to_dict()}
        for name in ("data", "train"):
            section = getattr(self, name)
            out[name] = {f.name: _plain(getattr(section, f.name)) for f in fields(section)}
        return out

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "config") -> "RunConfig":
        """Strict: unknown sections or keys and wrongly typed values raise ConfigError."""
        return resolve_config(layers=[(source, d)])

    def to_toml(self) -> str:
        lines = ["# imagetx run configuration (resolved); reuse it with: imagetx train --config THIS_FILE"]
        for section, values in self.to_dict().items():
            lines += ["", f"[{section}]"]
            # TOML has no null: a None value is written by leaving the key out (it is the default)
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
        return "\n".join(lines) + "\n"


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


# ---- from a checkpoint --------------------------------------------------------------------------
def stored_config(ckpt: Mapping, path: str | os.PathLike = "checkpoint") -> dict:
    """The run configuration (RunConfig.to_dict()) of a loaded checkpoint. Raises CheckpointError
    naming the first section or key that this imagetx does not know: never silently dropped."""
    config, known = ckpt["config"], RunConfig().to_dict()
    for section, values in config.items():
        if section not in known:
            raise CheckpointError(f"{path}: its config has an unknown section [{section}]; it is not from this imagetx")
        for key in values if isinstance(values, Mapping) else ():
            if key not in known[section]:
                raise CheckpointError(f"{path}: its config has an unknown key {section}.{key}; it is not from this imagetx")
    return config


def data_config_from_checkpoint(
    ckpt: Mapping,
    path: str | os.PathLike = "checkpoint",
    dataset: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
) -> DataConfig:
    """The data settings of a loaded checkpoint, with the data set and directory the user names.
    Naming another data set starts from the defaults: the CelebA protocol and builtin size only
    carry over for the data set the model was trained on. The data cache is this machine's
    default (IMAGETX_CACHE_DIR or the user cache folder), not the folder of the machine that
    trained. Raises CheckpointError naming a key this imagetx does not know."""
    data = DataConfig(**dict(stored_config(ckpt, path).get("data") or {}))
    data.cache_dir = None
    if dataset is not None and dataset != data.name:
        data = DataConfig(name=dataset)
    if data_dir is not None:
        data.data_dir = data_dir
    data.download = download
    return data


# ---- loading and overrides ----------------------------------------------------------------------
def load_config(
    path: str | os.PathLike | None = None,
    flags: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
) -> RunConfig:
    """Resolve a run configuration: defaults < the TOML file at `path` < `flags` ({"train.out":
    ...} from explicit CLI flags; None values ignored) < `sets` ("section.key=value" strings).
    The keys the file, flags and sets give are recorded in RunConfig.explicit (a resumed run
    takes the others from its checkpoint). Raises ConfigError listing every problem."""
    layers, problems = layers_from(path, flags, sets)
    return resolve_config(layers, problems)


def resolve_config(
    layers: list[tuple[str, Mapping]], problems: list[str] | None = None, base: Mapping | None = None
) -> RunConfig:
    """Merge (source, nested dict) layers over the defaults and `base` (a resumed checkpoint's
    config), type-check and validate. RunConfig.explicit records the keys the layers give."""
    merged, explicit, unknown = merge_layers(RunConfig().to_dict(), layers, base)
    problems = list(problems or []) + unknown

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in merged[section].items():
            checked, problem = check_type(value, hints[key], f"{section}.{key}")
            if problem:
                problems.append(problem)
            else:
                values[key] = checked
        if cls is ModelConfig:
            try:
                sections[section] = ModelConfig(**values)
            except ConfigError as exc:
                problems += exc.problems
        else:
            sections[section] = cls(**values)
    if "model" in sections:
        config = RunConfig(**sections, explicit=frozenset(explicit))
        problems += [p for p in config.problems() if p not in problems]
    else:
        problems += [p for p in sections["data"].problems() + sections["train"].problems()]
    if problems:
        raise ConfigError(problems)
    return config


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the config as TOML, atomically."""
    from imagetx.system.atomic import atomic_write

    atomic_write(path, config.to_toml().encode())


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
