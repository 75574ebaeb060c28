"""Options several commands take, declared once each (Typer needs a fresh Option per parameter,
so each is a function)."""

from __future__ import annotations

import typer


def device_option():
    return typer.Option("auto", help="auto, cpu, cuda or cuda:N.")


def decode_option():
    return typer.Option("auto", help="sequential (one position per step), parallel (Jacobi passes of --window positions: "
                        "the same images) or auto (parallel where faster: the fused CPU step at batch 1).")


def window_option():
    # model.decoding.DEFAULT_WINDOW, written out: this module imports no torch (tests/cli/test_cli.py checks they agree)
    return typer.Option(8, help="Positions per pass of --decode parallel.")


def compile_option():
    return typer.Option(None, "--compile/--no-compile", show_default="on a GPU",
                        help="Decode through the static-shape step compiled by torch.compile (one CUDA graph per step "
                        "on a GPU). The first step waits for the compiler: a short job may end sooner with --no-compile.")


def download_option():
    return typer.Option(False, "--download", help="Fetch the data set through torchvision if missing.")


def checkpoint_argument(what: str = ""):
    return typer.Argument(..., metavar="CHECKPOINT", help=f"{what}Checkpoint file, run directory (its newest checkpoint), "
                          "`imagetx export` folder or a pretrained model's name (imagetx models).")


def weights_option():
    return typer.Option("auto", help="auto (the moving average of the weights when the run kept one: train.ema), ema, or trained.")
