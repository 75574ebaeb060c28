"""imagetx: the Image Transformer (Parmar et al., 2018) for autoregressive image generation.

Where everything lives (one line a module):

    cli.py            the `imagetx` command: parse, build a config, call a run(config), map errors to exit codes
    config.py         RunConfig = ModelConfig + DataConfig + TrainConfig; TOML, --set overrides, validation
    checks.py         the one check of each user value several commands take (seed, temperature, label, outputs)
    errors.py         every expected failure type (ConfigError exit 2; CheckpointError, RunError, ... exit 1)
    console.py        every note, warning and error line on stderr, and progress (a bar, or lines in a log)
    atomic.py         atomic_write, atomic_path: every file is written to a temporary name and renamed
    train.py          `imagetx train`: the training loop (Trainer) and run(config, resume)
    rundir.py         a run directory: resume_from (the one resume path), config.toml, metrics, checkpoints, grids
    lock.py           the locks that keep a second trainer out of a run directory and a second converter off a cache entry
    optim.py          the optimizer and the learning-rate schedule
    signals.py        SIGINT / SIGTERM: stop cleanly after the step with a checkpoint
    evaluate.py       `imagetx eval-bpd`: exact bits/dim over a split (EvalConfig, run)
    sample.py         `imagetx sample`: images from a checkpoint (SampleConfig, run)
    superres.py       `imagetx superres`: super-resolve files or held-out images (SuperResConfig, run)
    metrics.py        bits/dim, PSNR, consistency and the super-resolution report
    plot.py           `imagetx plot`: learning curves of runs as a PNG (and RUN/curves.png during training)
    export.py         `imagetx export`: a safetensors folder with config.json and a model card; read_export
    loggers.py        train.logger: TensorBoard and W&B beside metrics.jsonl
    fid.py            `imagetx eval-fid`: FID with pytorch-fid's Inception-v3 from a file the user supplies
    checkpoint.py     checkpoint files: save, find, load and check, build the model from one
    images.py         image files in (every Pillow mode, checked) and out (PNG, grids, npz)
    distributed.py    devices, torchrun process groups and the collectives training and evaluation use
    memory.py         tcmalloc/jemalloc for CPU runs, resident-memory numbers
    precision.py      fp32 or bf16 mixed precision: "auto" asks the GPU or reads the CPU's bf16 features, and says why
    compiling.py      torch.compile where this machine can build its code (compiler, headers), eager otherwise
    data/             one reader per on-disk format (cifar, idx, imagenet, celeba, folder, builtin) -> uint8
                      (N, H, W, C); dataset.py the data set classes, transforms.py resizing and channels,
                      superres.py low/high-resolution pairs, batches.py config -> data set -> batches,
                      order.py the epoch order and each process's share, cache.py the decoded-data cache
    model/            config.py ModelConfig; layout.py generation order, internal layout and masks;
                      attention.py the three patterns and their caches; layers.py dropout, FFN, residual;
                      kernels.py the fast CPU kernels behind reference_mode(); position.py 2D position
                      encodings; relative.py relative logits and rotary embeddings; dmol.py the discretized logistic mixture; transformer.py the model;
                      decoding.py cached and reference sampling, the bf16 decoding copy;
                      consistency.py the values that keep a super-resolution consistent with its input
"""

from importlib import import_module

__all__ = ["ConfigError", "ModelConfig", "ImageTransformer", "load_model"]
__version__ = "0.1.1"

# Imported on first use, not with the package: `import imagetx` stays free of torch, so the console
# script installs its error boundary (imagetx.cli) before anything slow is imported, and a Ctrl-C
# during start-up is one line, not a traceback.
_HOMES = {"ConfigError": "imagetx.errors", "ModelConfig": "imagetx.model.config",
          "ImageTransformer": "imagetx.model.transformer", "load_model": "imagetx.checkpoint"}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imagetx' has no attribute {name!r}")
