"""The `imagetx` command: parse arguments, build a config, call a library function, map errors.

Results go to stdout, progress and diagnostics to stderr. Exit codes: 0 ok, 1 a runtime failure
(missing data, bad checkpoint, non-finite loss), 2 a usage error (bad flag, unknown key, bad
value), 130 after Ctrl-C (a checkpoint is saved first), 143 after SIGTERM.
"""

from __future__ import annotations

import signal
import sys


def _interrupted_while_starting(signum, frame):
    sys.stderr.write("error: interrupted\n")
    raise SystemExit(130)


# The error boundary goes up before anything slow is imported (Typer here, torch in each command):
# a Ctrl-C while the console script starts is one line and exit 130, as later, not a traceback.
# Only while this module is imported; from then on main() catches the KeyboardInterrupt.
try:
    _sigint_before = signal.getsignal(signal.SIGINT)
    if _sigint_before is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, _interrupted_while_starting)
        except ValueError:  # imported outside the main thread: nothing to install
            pass
except KeyboardInterrupt:  # it came while the handler was being installed (signal.signal runs Python code)
    _interrupted_while_starting(signal.SIGINT, None)

import importlib
import json
import os
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

try:  # Typer >= 0.17 carries its own copy of Click
    from typer._click.exceptions import ClickException as _ClickException
    from typer._click.exceptions import NoArgsIsHelpError as _NoArgsIsHelp
except ImportError:
    from click.exceptions import ClickException as _ClickException
    from click.exceptions import NoArgsIsHelpError as _NoArgsIsHelp
from imagetx import console
from imagetx.errors import CheckpointError, ConfigError, DatasetError, RunError

app = typer.Typer(
    name="imagetx",
    help="The Image Transformer (Parmar et al., 2018): train, measure exact bits/dim, sample, super-resolve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # help texts render as written: "[train.out]" is text, not markup
)


def _one_line(exc: BaseException) -> str:
    """The user-facing line of an exception. One re-raised from a DataLoader worker carries the
    worker's whole traceback in its message: its last line is the original message."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(exc, OSError) and exc.strerror:  # disk full, permission denied, is a directory...
        where = exc.filename if exc.filename is not None else ""
        text = f"{where}: {exc.strerror}" if where else exc.strerror
    return text


class _Command(typer.core.TyperCommand):
    """Usage lines name arguments plainly (`imagetx sample [OPTIONS] CHECKPOINT`), not in braces;
    a Ctrl-C anywhere in a command is one `error: interrupted` line and exit 130 (Typer alone
    turns it into a silent 130 where it lands outside the error boundary, e.g. while the command
    imports its modules)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]

    ran = False  # a command was invoked: it reports its own interruption (see main)

    def invoke(self, ctx):
        _Command.ran = True
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            console.error("interrupted")
            raise typer.Exit(130) from None


@contextmanager
def _expected_failures():
    """The CLI's one error boundary. Expected failures become one `error: ...` line on stderr and
    an exit code, never a traceback: 2 for usage (ConfigError), 1 at runtime (a checkpoint, data
    set, image or file that cannot be used, the disk full), 130 on Ctrl-C. Anything else is a bug:
    its traceback is shown with a line asking to report it. IMAGETX_DEBUG=1 shows the traceback
    of every failure."""
    debug = os.environ.get("IMAGETX_DEBUG", "") not in ("", "0")
    try:
        yield
    except ConfigError as exc:
        if debug:
            raise
        console.error("; ".join(exc.problems))
        raise typer.Exit(2) from None
    except (CheckpointError, RunError, DatasetError, OSError) as exc:
        if debug:
            raise
        # a DatasetError's first line says what is wrong; the rest shows the expected tree
        console.error(_one_line(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        if debug:
            raise
        console.error("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception:
        if debug:
            raise
        traceback.print_exc()
        console.error("this is a bug in imagetx: please report it with the traceback above and the command you ran")
        raise typer.Exit(1) from None


def _check_outputs(files=(), dirs=()) -> None:
    """The one check of every command's outputs, at the boundary and before any work: each
    (flag, path) of a file to write (files) or a directory to write into (dirs), None for one
    not given. An output that is a directory where a file is meant (or the other way round), or
    in a directory that does not exist or cannot be written, is a usage error (exit 2) in every
    command alike. sample and superres make the same checks (imagetx.checks) in their own
    problems(), where they are reported together with the command's other usage errors."""
    from imagetx.checks import output_dir_problems, output_file_problems
    from imagetx.errors import raise_problems

    problems = [p for flag, path in files if path is not None for p in output_file_problems(path, flag)]
    problems += [p for flag, path in dirs if path is not None for p in output_dir_problems(path, flag)]
    raise_problems(problems)


# Options several commands take, declared once each (Typer needs a fresh Option per parameter).
def _device_option():
    return typer.Option("auto", help="auto, cpu, cuda or cuda:N.")


def _decode_option():
    return typer.Option("auto", help="sequential (one position per step), parallel (Jacobi passes of --window positions: "
                        "the same images) or auto (parallel where faster: the fused CPU step at batch 1).")


def _window_option():
    # model.decoding.DEFAULT_WINDOW, written out: this module imports no torch (tests/test_cli.py checks they agree)
    return typer.Option(8, help="Positions per pass of --decode parallel.")


def _download_option():
    return typer.Option(False, "--download", help="Fetch the data set through torchvision if missing.")


def _checkpoint_argument(what: str = ""):
    return typer.Argument(..., metavar="CHECKPOINT", help=f"{what}Checkpoint file, run directory (its newest checkpoint), "
                          "`imagetx export` folder or a pretrained model's name (imagetx models).")


def _weights_option():
    return typer.Option("auto", help="auto (the moving average of the weights when the run kept one: train.ema), ema, or trained.")


@app.command(cls=_Command)
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
    download: bool = _download_option(),
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
    with _expected_failures():
        # on resume, the keys given here go over the checkpoint's config (imagetx.training.rundir.resume_from)
        resolved = load_config(config, flags, set_ or [])
        if show_config:
            from imagetx.training.rundir import resume_from

            typer.echo(resume_from(resolved, resume)[0].to_toml(), nl=False)
            return
        _check_outputs(dirs=[("--out", resolved.train.out)])
        summary = training.run(resolved, resume=resume)
    code = training.EXIT_STATUS[summary["status"]]
    if code:
        raise typer.Exit(code)


@app.command("eval-bpd", cls=_Command)
def eval_bpd(
    checkpoint: Path = _checkpoint_argument(),
    dataset: Optional[str] = typer.Option(None, help="Data set name (default: the one the model was trained on)."),
    data_dir: Optional[str] = typer.Option(None, help="Directory holding the data set."),
    split: str = typer.Option("test", help="Split to evaluate."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N images."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass (per process)."),
    device: str = _device_option(),
    download: bool = _download_option(),
    num_workers: int = typer.Option(0, min=0, help="DataLoader worker processes."),
    precision: str = typer.Option("fp32", help="fp32 (exact), or bf16 / auto (bf16 where native): faster, approximate, labelled so."),
    source_model: Optional[Path] = typer.Option(None, metavar="RUN", help="Super-resolution: a model of the low-resolution inputs; "
                                                "also report their bits and the chain-rule total per target dimension."),
    weights: str = _weights_option(),
    as_json: bool = typer.Option(False, "--json", help='Print {"bpd", "images", "dataset", "split", "precision", ...} as JSON.'),
) -> None:
    """Exact bits/dim of a checkpoint over a whole split: one deterministic fp32 pass in eval mode.

    Under torchrun every image is counted exactly once, e.g.
    torchrun --nproc_per_node 4 -m imagetx.cli eval-bpd runs/cifar10 --json
    """
    from imagetx.eval_bpd import EvalConfig, run

    eval_config = EvalConfig(
        checkpoint=checkpoint, dataset=dataset, data_dir=data_dir, split=split, limit=limit,
        batch_size=batch_size, device=device, download=download, num_workers=num_workers,
        precision=precision, source_model=source_model, weights=weights,
    )
    with _expected_failures():
        result = run(eval_config)
    from imagetx.system.distributed import env_ranks

    if env_ranks()[0] != 0:
        return
    if as_json:
        keys = ("bpd", "images", "dataset", "split", "nll_nats", "checkpoint", "step", "weights", "precision", "approximate",
                "source_model", "source_bpd", "source_bits_per_target_dim", "chain_bpd")
        typer.echo(json.dumps({k: result[k] for k in keys if k in result}))
        return
    from rich.console import Console
    from rich.table import Table

    approximate = result["approximate"]
    title = f"Approximate bits/dim ({result['precision']}; fp32 is exact)" if approximate else "Exact bits/dim"
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("checkpoint", f"{result['checkpoint']} (step {result['step']})")
    table.add_row("weights", result["weights"])
    table.add_row("data set", result["dataset"])
    table.add_row("split", str(result["split"]))
    table.add_row("images", str(result["images"]))
    table.add_row("NLL per image", f"{result['nll_nats']:.2f} nats")
    table.add_row("precision", f"{result['precision']} (approximate)" if approximate else result["precision"])
    conditional = " (conditional on the input)" if "chain_bpd" in result else ""
    table.add_row("bits/dim" + conditional, f"[bold]{result['bpd']:.4f}[/bold]" + (" (approximate)" if approximate else ""))
    if "chain_bpd" in result:
        table.add_row("source model", result["source_model"])
        table.add_row("input bits/dim", f"{result['source_bpd']:.4f} per input dimension, "
                                        f"{result['source_bits_per_target_dim']:.4f} per target dimension")
        table.add_row("chain-rule total", f"[bold]{result['chain_bpd']:.4f}[/bold] bits per target dimension "
                                          "(input + target given input; compare with an unconditional model)")
    Console(file=sys.stdout).print(table)


@app.command(cls=_Command)
def sample(
    checkpoint: Path = _checkpoint_argument(),
    num: int = typer.Option(16, "--num", "-n", help="Number of images."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (>= 0; 0 = greedy)."),
    label: Optional[int] = typer.Option(None, help="Class for class-conditional models (default: a balanced spread over classes)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same images."),
    batch_size: int = typer.Option(16, help="Images decoded together."),
    device: str = _device_option(),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Grid PNG (default: samples.png unless --individual or --npz is given)."),
    individual: Optional[Path] = typer.Option(None, help="Directory for one PNG per image."),
    npz: Optional[Path] = typer.Option(None, help="Write all images as a uint8 (N, H, W, C) array under arr_0 (what FID tools read)."),
    prime: Optional[Path] = typer.Option(None, help="Complete this image: its top rows are kept, the rest is sampled."),
    prime_rows: Optional[int] = typer.Option(None, help="Rows of --prime to keep (default: half)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole model at every step (the slow reference path)."),
    precision: str = typer.Option("auto", help="auto (bf16 where the hardware has it natively), fp32 or bf16; the softmax over values stays fp32."),
    weights: str = _weights_option(),
    decode: str = _decode_option(),
    window: int = _window_option(),
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
    req = SampleConfig(
        checkpoint=checkpoint, num=num, temperature=temperature, label=label, seed=seed,
        batch_size=batch_size, device=device, out=out, individual=individual, npz=npz,
        prime=prime, prime_rows=prime_rows, use_cache=not no_cache, precision=precision, weights=weights,
        decode=decode, window=window,
    )
    with _expected_failures():
        summary = run(req)
    if env_ranks()[0] != 0:  # under torchrun the main process reports
        return
    if as_json:
        typer.echo(json.dumps(summary))
        return
    for path in summary["written"]:
        typer.echo(path)
    fused = ", fused C step" if summary["decoder"] == "fused" else ""
    processes = f", {summary['processes']} processes" if summary["processes"] > 1 else ""
    console.note(f"{summary['images']} images in {summary['seconds']:.1f} s "
                 f"({summary['ms_per_position']:.2f} ms per position, {summary['precision']}{fused}{processes})")


@app.command(cls=_Command)
def superres(
    checkpoint: Path = _checkpoint_argument("A super-resolution model. "),
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
    device: str = _device_option(),
    out: Path = typer.Option(Path("superres"), "--out", "-o", help="Output directory: one PNG per sample and comparison.png."),
    report: bool = typer.Option(False, help="Score the samples: conditional bits/dim, consistency, PSNR."),
    precision: str = typer.Option("auto", help="Sampling precision: auto (bf16 where native), fp32 or bf16; --report's bits/dim stay fp32."),
    consistent: bool = typer.Option(False, help="Draw only values that keep each sample's area downsampling equal to its input, "
                                    "exactly; with --report the unrestricted samples are drawn and scored too."),
    weights: str = _weights_option(),
    decode: str = _decode_option(),
    window: int = _window_option(),
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

    req = SuperResConfig(
        checkpoint=checkpoint, inputs=input, dataset=dataset, data_dir=data_dir, split=split, num=num,
        samples=samples, temperature=temperature, label=label, seed=seed, batch_size=batch_size,
        device=device, out=out, report=report, precision=precision, consistent=consistent, weights=weights,
        decode=decode, window=window,
    )
    with _expected_failures():
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
            _print_superres_report(summary["metrics"], summary.get("metrics_unrestricted"))
    if failures:  # each was named in a warning as it was skipped
        total = len(failures) + len(summary["inputs"])
        console.error(f"{len(failures)} of {total} inputs could not be used and were skipped; the others were written")
        raise typer.Exit(1)


def _print_superres_report(metrics: dict, unrestricted: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    table = Table(title="Super-resolution report")
    for col in ("input", "bits/dim", "consistency", "PSNR samples", "PSNR bicubic"):
        table.add_column(col, justify="right" if col != "input" else "left")
    for row in metrics["per_input"]:
        table.add_row(row["input"], fmt(row.get("bpd"), ".4f"), fmt(row.get("consistency"), ".2f"),
                      fmt(row.get("psnr"), ".2f"), fmt(row.get("psnr_bicubic"), ".2f"))
    mean = metrics["mean"]
    table.add_row("[bold]mean[/bold]", fmt(mean.get("bpd"), ".4f"), fmt(mean.get("consistency"), ".2f"),
                  fmt(mean.get("psnr"), ".2f"), fmt(mean.get("psnr_bicubic"), ".2f"))
    if unrestricted is not None:  # --consistent: the rows above are the consistent samples
        other = unrestricted["mean"]
        table.add_row("[bold]mean, without --consistent[/bold]", "", fmt(other.get("consistency"), ".2f"),
                      fmt(other.get("psnr"), ".2f"), "")
    Console(file=sys.stdout).print(table)


@app.command(cls=_Command)
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

    with _expected_failures():
        _check_outputs(files=[("--out", out)])
        summary = plot_runs(runs, out)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(summary["out"])
    for r in summary["runs"]:
        best = "-" if r["best_eval_bpd"] is None else f"{r['best_eval_bpd']:.4f}"
        console.note(f"{r['run']}: best held-out {best} bits/dim, {r['steps']} steps")


@app.command(cls=_Command)
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
    if not rows:
        console.note("no pretrained models are installed")
    for r in rows:
        H, W = r["image_size"]
        typer.echo(f"{r['name']}: {H}x{W}x{r['channels']}, {r['kind']}, trained on {r['dataset']}")
        held = "no held-out bits/dim recorded" if r["bpd"] is None else f"{r['bpd']:.4f} bits/dim on {r['images']} {r['split']} images"
        hours = "" if r["hours"] is None else f" in {r['hours']:.2f} h"
        where = f" on {r['cpu']} (commit {r['commit']})" if r["cpu"] else ""
        typer.echo(f"    {held}; {r['steps']} steps{hours}{where}")


@app.command(cls=_Command)
def export(
    run: Path = typer.Argument(..., metavar="RUN", help="Run directory (its newest checkpoint) or a checkpoint file."),
    out: Path = typer.Option(..., "--out", "-o", help="New (or empty) folder to write."),
    weights: str = _weights_option(),
    as_json: bool = typer.Option(False, "--json", help='Print {"out", "checkpoint", "step", "files", "held_out", "weights"} as JSON.'),
) -> None:
    """Export a model for sharing: a folder with model.safetensors, config.json and a README.md
    model card (data set, held-out bits/dim, training time, sample grid, commands).

    The folder appears whole or not at all. load_model, sample, eval-bpd and superres take it in
    place of a checkpoint, e.g.  imagetx export runs/quickstart --out quickstart-model
    """
    from imagetx.export import export as export_run

    with _expected_failures():
        _check_outputs(dirs=[("--out", out)])
        summary = export_run(run, out, weights)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    for name in summary["files"]:
        typer.echo(str(Path(summary["out"]) / name))
    what = "the moving average of its weights" if summary["weights"] == "ema" else "its trained weights"
    console.note(f"exported {summary['checkpoint']} (step {summary['step']}, {what}) to {summary['out']}")


@app.command("eval-fid", cls=_Command)
def eval_fid(
    checkpoint: Path = _checkpoint_argument(),
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
    device: str = _device_option(),
    cache_dir: Optional[Path] = typer.Option(None, help="Where reference statistics are cached (default ~/.cache/imagetx/fid)."),
    decode: str = _decode_option(),
    window: int = _window_option(),
    weights: str = _weights_option(),
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

    req = FidConfig(
        checkpoint=checkpoint, inception_weights=inception_weights, npz=npz, num=num, temperature=temperature,
        seed=seed, dataset=dataset, data_dir=data_dir, split=split, limit=limit, batch_size=batch_size,
        sample_batch_size=sample_batch_size, dims=dims, device=device, cache_dir=cache_dir, weights=weights,
        decode=decode, window=window,
    )
    with _expected_failures():
        _check_outputs(dirs=[("--cache-dir", cache_dir)])
        result = run(req)
    if result is None:  # under torchrun the main process scores and reports
        return
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"FID {result['fid']:.3f}")
    console.note(f"{result['samples']} samples against {result['reference_images']} images of {result['dataset']} "
                 f"({result['split']}){'; reference statistics from the cache' if result['cached'] else ''}")


_COMPUTE_COMMANDS = {"train", "eval-bpd", "sample", "superres", "eval-fid"}


def _import_torch_deferring_ctrl_c() -> None:
    """Import torch (and numpy through it) with SIGINT held back until the import is done.

    torch's start-up imports numpy from C++ and treats any failure as "numpy unavailable", clearing
    the error: a Ctrl-C that lands there is lost and the command runs on (a training run then goes
    on for its whole length). Elsewhere in the import a Ctrl-C can abort the process from inside a
    pybind11 callback, or leave a half-imported extension that fails as "cannot load module more
    than once". Held back, it is delivered as soon as the import ends: one `error: interrupted`
    line and exit 130, as at any later moment."""
    posix = hasattr(signal, "pthread_sigmask")  # elsewhere there is nothing to hold back
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if posix else None
    try:
        importlib.import_module("torch")
    finally:
        if posix:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:  # the module is imported: main() takes over
    signal.signal(signal.SIGINT, _sigint_before)


def main() -> None:
    """The console script: the compute commands first restart once with tcmalloc or jemalloc
    preloaded when one is installed (see imagetx.system.allocator; IMAGETX_ALLOCATOR=system to keep malloc)."""
    # library warnings (a skipped file in a data set, an outdated checkpoint) are one line on
    # stderr, like every other diagnostic
    warnings.showwarning = lambda message, *args, **kwargs: console.warn(str(message))
    try:
        if len(sys.argv) > 1 and sys.argv[1] in _COMPUTE_COMMANDS:
            from imagetx.system.allocator import restart_with_fast_allocator

            restart_with_fast_allocator()
            _import_torch_deferring_ctrl_c()
        code = app(standalone_mode=False, prog_name="imagetx")
    except _ClickException as exc:  # Typer's own usage errors, in the same one-line form as ours
        if isinstance(exc, _NoArgsIsHelp):
            typer.echo(exc.format_message())
        else:
            command = " ".join(a for a in sys.argv[1:2] if not a.startswith("-"))
            console.error(f"{exc.format_message()} (see: imagetx {command + ' ' if command else ''}--help)")
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):  # Ctrl-C while Python, torch or the command starts up
        console.error("interrupted")
        sys.exit(130)
    if code == 130 and not _Command.ran:  # Ctrl-C while the arguments were parsed: Typer's silent 130
        console.error("interrupted")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
