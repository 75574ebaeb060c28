"""The `imagetx` commands: each parses its arguments, builds its command's config, calls the
library function and shows the result (tables: imagetx.cli.tables). Errors are mapped to exit
codes by imagetx.cli.boundary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from imagetx import console
from imagetx.cli.boundary import Command, check_outputs, expected_failures
from imagetx.cli.options import (
    checkpoint_argument, compile_option, decode_option, device_option, download_option, weights_option, window_option,
)
from imagetx.cli.tables import print_bpd_table, print_models, print_superres_report

app = typer.Typer(
    name="imagetx",
    help="The Image Transformer (Parmar et al., 2018): train, measure exact bits/dim, sample, super-resolve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # help texts render as written: "[train.out]" is text, not markup
)


def _library_config(cls, options: dict, **renamed):
    """The command's library config from its options: each option goes to the field of its name
    (renamed: field=value where they differ); options the config has no field for (--json) stay
    with the command. tests/cli/test_cli.py holds each config's fields and defaults to the options."""
    from dataclasses import fields

    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names}, **renamed)


@app.command(cls=Command)
def train(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="TOML run configuration, e.g. configs/cifar10.toml (default: the quickstart)."
    ),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory [train.out]."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N [train.device]."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps [train.max_steps]."),
    max_minutes: Optional[float] = typer.Option(
        None, help="Stop cleanly with a checkpoint after this many minutes [train.max_minutes]."
    ),
    batch_size: Optional[int] = typer.Option(None, help="Images per process per micro-batch [train.batch_size]."),
    seed: Optional[int] = typer.Option(None, help="Random seed [train.seed]."),
    resume: Optional[str] = typer.Option(
        None, help='"auto" to continue from the newest checkpoint in the run directory, or a checkpoint path.'
    ),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", "-s", metavar="SECTION.KEY=VALUE",
        help="Override any config key, e.g. --set train.lr=1e-3 --set model.n_layers=6 (repeatable; wins over everything).",
    ),
    dataset: Optional[str] = typer.Option(None, help="Data set name, e.g. cifar10, fashion-mnist [data.name]."),
    data_dir: Optional[str] = typer.Option(None, help="Directory holding the data set [data.data_dir]."),
    download: bool = download_option(),
    show_config: bool = typer.Option(
        False, "--show-config", help="Print the resolved configuration (TOML, with --resume the resumed one) and exit."
    ),
) -> None:
    """Train an Image Transformer; write config.toml, metrics.jsonl, checkpoints and sample grids.

    With no arguments, trains the quickstart model on the built-in procedural shapes (no download)
    for a few minutes on a CPU and writes runs/quickstart/samples/*.png.

    Precedence: defaults < --config < these flags < --set. On several GPUs or nodes, launch with
    torchrun, e.g.  torchrun --nproc_per_node 8 -m imagetx.cli train --config configs/cifar10.toml
    """
    from imagetx import train as training
    from imagetx.config import load_config

    flags = {
        "train.out": out, "train.device": device, "train.max_steps": max_steps,
        "train.max_minutes": max_minutes, "train.batch_size": batch_size, "train.seed": seed,
        "data.name": dataset, "data.data_dir": data_dir, "data.download": True if download else None,
    }
    with expected_failures():
        # on resume, the keys given here go over the checkpoint's config (imagetx.training.rundir.resume_from)
        resolved = load_config(config, flags, set_ or [])
        if show_config:
            from imagetx.training.rundir import resume_from

            typer.echo(resume_from(resolved, resume)[0].to_toml(), nl=False)
            return
        check_outputs(dirs=[("--out", resolved.train.out)])
        summary = training.run(resolved, resume=resume)
    code = training.EXIT_STATUS[summary["status"]]
    if code:
        raise typer.Exit(code)


@app.command("eval-bpd", cls=Command)
def eval_bpd(
    checkpoint: Path = checkpoint_argument(),
    dataset: Optional[str] = typer.Option(None, help="Data set name (default: the one the model was trained on)."),
    data_dir: Optional[str] = typer.Option(None, help="Directory holding the data set."),
    split: str = typer.Option("test", help="Split to evaluate."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N images."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass (per process)."),
    device: str = device_option(),
    download: bool = download_option(),
    num_workers: int = typer.Option(0, min=0, help="DataLoader worker processes."),
    precision: str = typer.Option("fp32", help="fp32 (exact), or bf16 / auto (bf16 where native): faster, approximate, labelled so."),
    source_model: Optional[Path] = typer.Option(None, metavar="RUN", help="Super-resolution: a model of the low-resolution inputs; "
                                                "also report their bits and the chain-rule total per target dimension."),
    weights: str = weights_option(),
    as_json: bool = typer.Option(False, "--json", help='Print {"bpd", "images", "dataset", "split", "precision", ...} as JSON.'),
) -> None:
    """Exact bits/dim of a checkpoint over a whole split: one deterministic fp32 pass in eval mode.

    Under torchrun every image is counted exactly once, e.g.
    torchrun --nproc_per_node 4 -m imagetx.cli eval-bpd runs/cifar10 --json
    """
    from imagetx.eval_bpd import EvalConfig, run

    eval_config = _library_config(EvalConfig, locals())
    with expected_failures():
        result = run(eval_config)
    from imagetx.system.distributed import env_ranks

    if env_ranks()[0] != 0:
        return
    if as_json:
        keys = ("bpd", "images", "dataset", "split", "nll_nats", "checkpoint", "step", "weights", "precision", "approximate",
                "source_model", "source_bpd", "source_bits_per_target_dim", "chain_bpd")
        typer.echo(json.dumps({k: result[k] for k in keys if k in result}))
        return
    print_bpd_table(result)


@app.command(cls=Command)
def sample(
    checkpoint: Path = checkpoint_argument(),
    num: int = typer.Option(16, "--num", "-n", help="Number of images."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (>= 0; 0 = greedy)."),
    label: Optional[int] = typer.Option(None, help="Class for class-conditional models (default: a balanced spread over classes)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same images."),
    batch_size: int = typer.Option(16, help="Images decoded together."),
    device: str = device_option(),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Grid PNG (default: samples.png unless --individual or --npz is given)."),
    individual: Optional[Path] = typer.Option(None, help="Directory for one PNG per image."),
    npz: Optional[Path] = typer.Option(None, help="Write all images as a uint8 (N, H, W, C) array under arr_0 (what FID tools read)."),
    prime: Optional[Path] = typer.Option(None, help="Complete this image: its top rows are kept, the rest is sampled."),
    prime_rows: Optional[int] = typer.Option(None, help="Rows of --prime to keep (default: half)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole model at every step (the slow reference path)."),
    precision: str = typer.Option("auto", help="auto (bf16 where the hardware has it natively), fp32 or bf16; the softmax over values stays fp32."),
    weights: str = weights_option(),
    decode: str = decode_option(),
    window: int = window_option(),
    compile: Optional[bool] = compile_option(),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of the written paths."),
) -> None:
    """Draw images from a checkpoint with the cached decoder: a PNG grid, one PNG per image, or an npz.

    Unconditional or per class, at a chosen temperature, with a fixed seed; --prime completes
    a partial image (several completions with -n). Each image depends only on the seed and its
    index: under torchrun the processes share the images and write the same files as one, e.g.
    torchrun --nproc_per_node 4 -m imagetx.cli sample runs/cifar10 -n 50000 --npz samples.npz
    """
    from imagetx.system.distributed import env_ranks
    from imagetx.sample import SampleConfig, run

    if out is None and individual is None and npz is None:
        out = Path("samples.png")
    req = _library_config(SampleConfig, locals(), use_cache=not no_cache)
    with expected_failures():
        summary = run(req)
    if env_ranks()[0] != 0:  # under torchrun the main process reports
        return
    if as_json:
        typer.echo(json.dumps(summary))
        return
    for path in summary["written"]:
        typer.echo(path)
    fused = {"fused": ", fused C step", "compiled": ", compiled step", "static": ", static step"}.get(summary["decoder"], "")
    processes = f", {summary['processes']} processes" if summary["processes"] > 1 else ""
    console.note(f"{summary['images']} images in {summary['seconds']:.1f} s "
                 f"({summary['ms_per_position']:.2f} ms per position, {summary['precision']}{fused}{processes})")


@app.command(cls=Command)
def superres(
    checkpoint: Path = checkpoint_argument("A super-resolution model. "),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="A low-resolution image, or a directory of images."),
    dataset: Optional[str] = typer.Option(None, help="Or: make low-resolution inputs from held-out images of this data set."),
    data_dir: Optional[str] = typer.Option(None, help="Directory holding --dataset."),
    split: str = typer.Option("test", help="Split of --dataset."),
    num: int = typer.Option(8, "--num", "-n", help="Number of --dataset images."),
    samples: int = typer.Option(1, help="Super-resolutions per input."),
    temperature: float = typer.Option(0.9, help="Sampling temperature (the paper uses 1.0, 0.9, 0.8)."),
    label: Optional[int] = typer.Option(None, help="Class, for class-conditional models with --input."),
    seed: int = typer.Option(0, help="Random seed."),
    batch_size: int = typer.Option(16, help="Sequences decoded together."),
    device: str = device_option(),
    out: Path = typer.Option(Path("superres"), "--out", "-o", help="Output directory: one PNG per sample and comparison.png."),
    report: bool = typer.Option(False, help="Score the samples: conditional bits/dim, consistency, PSNR."),
    precision: str = typer.Option("auto", help="Sampling precision: auto (bf16 where native), fp32 or bf16; --report's bits/dim stay fp32."),
    consistent: bool = typer.Option(False, help="Draw only values that keep each sample's area downsampling equal to its input, "
                                    "exactly; with --report the unrestricted samples are drawn and scored too."),
    weights: str = weights_option(),
    decode: str = decode_option(),
    window: int = window_option(),
    compile: Optional[bool] = compile_option(),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Super-resolve low-resolution images with a conditional (encoder-decoder) checkpoint.

    Images of another size are centre-cropped and area-resized to the model's input size, with a
    notice. comparison.png shows, per input: nearest neighbour, bicubic, the samples (with
    --consistent --report: the unrestricted ones, then the consistent ones), and the ground truth
    when known. Under torchrun the processes share the sequences; each depends only on the seed
    and its index, so the files are those of one process.
    """
    from imagetx.system.distributed import env_ranks
    from imagetx.superres import SuperResConfig, run

    req = _library_config(SuperResConfig, locals(), inputs=input)
    with expected_failures():
        summary = run(req)
    if env_ranks()[0] != 0:  # under torchrun the main process reports
        return
    failures = summary.get("failures") or []
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        for path in summary["written"]:
            typer.echo(path)
        if report and summary.get("metrics"):
            print_superres_report(summary["metrics"], summary.get("metrics_unrestricted"))
    if failures:  # each was named in a warning as it was skipped
        total = len(failures) + len(summary["inputs"])
        console.error(f"{len(failures)} of {total} inputs could not be used and were skipped; the others were written")
        raise typer.Exit(1)


@app.command(cls=Command)
def plot(
    runs: list[Path] = typer.Argument(..., metavar="RUN...", help="Run directories of `imagetx train` (their metrics.jsonl)."),
    out: Path = typer.Option(Path("curves.png"), "--out", "-o", help="PNG file to write."),
    as_json: bool = typer.Option(False, "--json", help='Print {"out", "runs": [{"run", "best_eval_bpd", "best_train_bpd", "steps"}]} as JSON.'),
) -> None:
    """Learning curves as one PNG: held-out and training bits/dim against step and against
    wall-clock time, one line per run, each run's best value marked.

    Comparing configs is one command, e.g.  imagetx plot runs/a runs/b --out compare.png
    (the trainer also redraws RUN/curves.png at each evaluation).
    """
    from imagetx.plot import plot_runs

    with expected_failures():
        check_outputs(files=[("--out", out)])
        summary = plot_runs(runs, out)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(summary["out"])
    for r in summary["runs"]:
        best = "-" if r["best_eval_bpd"] is None else f"{r['best_eval_bpd']:.4f}"
        console.note(f"{r['run']}: best held-out {best} bits/dim, {r['steps']} steps")


@app.command(cls=Command)
def models(
    as_json: bool = typer.Option(False, "--json", help='Print [{"name", "kind", "image_size", "dataset", "bpd", "split", "images", "steps", "hours", "cpu", "commit", ...}] as JSON.'),
) -> None:
    """The pretrained models installed with imagetx, with their held-out bits/dim. A name works
    wherever a checkpoint does, e.g.  imagetx sample fashion-mnist --label 7 -n 16
    (each model's card: imagetx/pretrained/NAME/README.md)."""
    from imagetx.storage.pretrained import catalog

    rows = catalog()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    print_models(rows)


@app.command(cls=Command)
def export(
    run: Path = typer.Argument(..., metavar="RUN", help="Run directory (its newest checkpoint) or a checkpoint file."),
    out: Path = typer.Option(..., "--out", "-o", help="New (or empty) folder to write."),
    weights: str = weights_option(),
    as_json: bool = typer.Option(False, "--json", help='Print {"out", "checkpoint", "step", "files", "held_out", "weights"} as JSON.'),
) -> None:
    """Export a model for sharing: a folder with model.safetensors, config.json and a README.md
    model card (data set, held-out bits/dim, training time, sample grid, commands).

    The folder appears whole or not at all. load_model, sample, eval-bpd and superres take it in
    place of a checkpoint, e.g.  imagetx export runs/quickstart --out quickstart-model
    """
    from imagetx.export import export as export_run

    with expected_failures():
        check_outputs(dirs=[("--out", out)])
        summary = export_run(run, out, weights)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    for name in summary["files"]:
        typer.echo(str(Path(summary["out"]) / name))
    what = "the moving average of its weights" if summary["weights"] == "ema" else "its trained weights"
    console.note(f"exported {summary['checkpoint']} (step {summary['step']}, {what}) to {summary['out']}")


@app.command("eval-fid", cls=Command)
def eval_fid(
    checkpoint: Path = checkpoint_argument(),
    inception_weights: Path = typer.Option(..., help="pytorch-fid's Inception-v3 weights file, pt_inception-2015-12-05-6726825d.pth (never downloaded)."),
    npz: Optional[Path] = typer.Option(None, help="Samples to score: uint8 (N, H, W, C) under arr_0 (imagetx sample --npz); default: draw --num."),
    num: int = typer.Option(1000, "--num", "-n", help="Samples to draw when no --npz is given."),
    temperature: float = typer.Option(1.0, help="Sampling temperature of the drawn samples."),
    seed: int = typer.Option(0, help="Random seed of the drawn samples."),
    dataset: Optional[str] = typer.Option(None, help="Reference data set (default: the one the model was trained on)."),
    data_dir: Optional[str] = typer.Option(None, help="Directory holding the data set."),
    split: str = typer.Option("test", help="Reference split."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N reference images."),
    batch_size: int = typer.Option(50, help="Images per Inception forward pass."),
    sample_batch_size: int = typer.Option(64, help="Images decoded together when drawing the samples (per process)."),
    dims: int = typer.Option(2048, help="Inception features: 2048 (standard FID), or 768, 192, 64 for quick relative checks."),
    device: str = device_option(),
    cache_dir: Optional[Path] = typer.Option(None, help="Where reference statistics are cached (default ~/.cache/imagetx/fid)."),
    decode: str = decode_option(),
    window: int = window_option(),
    compile: Optional[bool] = compile_option(),
    weights: str = weights_option(),
    as_json: bool = typer.Option(False, "--json", help='Print {"fid", "samples", "reference_images", "dataset", "split", ...} as JSON.'),
) -> None:
    """Frechet Inception Distance between samples and a data set split, with the standard
    Inception-v3 of pytorch-fid from a weights file you supply (it never downloads).

    The reference statistics of a split are cached. Only the standard weights give FIDs
    comparable with published ones, e.g.
    imagetx eval-fid runs/cifar10 --inception-weights pt_inception-2015-12-05-6726825d.pth -n 10000
    Under torchrun the processes share the drawing of the samples (the same samples as one).
    """
    from imagetx.eval_fid import FidConfig, run

    req = _library_config(FidConfig, locals())
    with expected_failures():
        check_outputs(dirs=[("--cache-dir", cache_dir)])
        result = run(req)
    if result is None:  # under torchrun the main process scores and reports
        return
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"FID {result['fid']:.3f}")
    console.note(f"{result['samples']} samples against {result['reference_images']} images of {result['dataset']} "
                 f"({result['split']}){'; reference statistics from the cache' if result['cached'] else ''}")


@app.command(cls=Command)
def serve(
    models: list[str] = typer.Argument(..., metavar="MODEL...", help="Run directories, checkpoints, `imagetx export` "
                                       "folders or pretrained names (imagetx models); each is loaded once."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; any other than the loopback one is open to "
                             "whoever can reach it (there is no authentication)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    device: str = device_option(),
    precision: str = typer.Option("auto", help="Sampling precision: auto (bf16 where native), fp32 or bf16; likelihoods stay fp32."),
    queue: int = typer.Option(4, help="Requests running or waiting at once; more are refused with 503."),
) -> None:
    """A local web page and HTTP API: watch a model sample, complete a drawing or an upload,
    super-resolve an upload, and see an image's bits/dim and where the model is surprised.

    Needs the serve extra (pip install 'imagetx[serve]'). The API (docs/serve.md) works with
    curl, e.g.  imagetx serve shapes fashion-mnist  then
    curl -X POST localhost:8000/api/sample -H 'content-type: application/json' -d '{"model": "shapes", "n": 4}' -o grid.png
    """
    from imagetx.serve.server import ServeConfig, run

    with expected_failures():
        run(_library_config(ServeConfig, locals()))
