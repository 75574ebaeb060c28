"""How the commands show their results on a terminal: rich tables and short listings on stdout
(each command's --json prints the same numbers for programs)."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from imagetx import console


def print_bpd_table(result: dict) -> None:
    """eval-bpd's result (imagetx.eval_bpd.run)."""
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


def print_superres_report(metrics: dict, unrestricted: dict | None = None) -> None:
    """superres --report's scores per input and their mean (imagetx.superres.run)."""
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


def print_models(rows: list[dict]) -> None:
    """The installed pretrained models (imagetx.storage.pretrained.catalog)."""
    if not rows:
        console.note("no pretrained models are installed")
    for r in rows:
        H, W = r["image_size"]
        typer.echo(f"{r['name']}: {H}x{W}x{r['channels']}, {r['kind']}, trained on {r['dataset']}")
        held = "no held-out bits/dim recorded" if r["bpd"] is None else f"{r['bpd']:.4f} bits/dim on {r['images']} {r['split']} images"
        hours = "" if r["hours"] is None else f" in {r['hours']:.2f} h"
        where = f" on {r['cpu']} (commit {r['commit']})" if r["cpu"] else ""
        typer.echo(f"    {held}; {r['steps']} steps{hours}{where}")
