"""`imagetx plot`: learning curves of one or more runs as one PNG, drawn with matplotlib (Agg).

Four panels: held-out and training bits/dim (rows) against optimizer step and against wall-clock
minutes (columns), one line per run, the best (lowest) value of each run marked and labelled.
Read from RUN/metrics.jsonl: training rows {step, train_bpd, elapsed_s} and held-out rows {step,
eval_bpd, elapsed_s (newer runs), eval_split, eval_images}. A resumed run restarts its clock at 0;
its times are laid end to end. The trainer redraws RUN/curves.png at each evaluation
(`refresh_curves`).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from imagetx.errors import RunError
from imagetx.system.atomic import atomic_write


@dataclass
class Curves:
    """The curves of one run: (step, minutes, bits/dim) points, oldest first."""

    name: str
    train: list[tuple[int, float, float]] = field(default_factory=list)
    held_out: list[tuple[int, float, float]] = field(default_factory=list)
    split: str | None = None  # of the held-out rows
    dataset: str | None = None  # the held-out data set's description (newer runs)
    images: int | None = None  # held-out images per evaluation


def read_curves(run: str | os.PathLike, name: str | None = None) -> Curves:
    """The curves of a run directory. Rows cut off by a crash are skipped. Raises RunError when
    the directory has no metrics.jsonl or it holds no bits/dim yet."""
    run = Path(run)
    path = run / "metrics.jsonl"
    if not path.is_file():
        what = "no such directory" if not run.exists() else "no metrics.jsonl in it"
        raise RunError(f"{run}: {what}; plot takes run directories of `imagetx train`")
    curves = Curves(name or run.name or str(run))
    offset, last_elapsed, last_time = 0.0, 0.0, 0.0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        elapsed = row.get("elapsed_s")
        if isinstance(elapsed, (int, float)):
            if elapsed < last_elapsed:  # a resumed run: its clock started again at 0
                offset += last_elapsed
            last_elapsed = float(elapsed)
            last_time = (offset + last_elapsed) / 60
        # a held-out row of an older run has no time of its own: that of the training row before it
        if _number(row.get("train_bpd")):
            curves.train.append((row["step"], last_time, float(row["train_bpd"])))
        if _number(row.get("eval_bpd")):
            curves.held_out.append((row["step"], last_time, float(row["eval_bpd"])))
            curves.split, curves.images = row.get("eval_split"), row.get("eval_images")
            curves.dataset = row.get("eval_dataset", curves.dataset)
    if not curves.train and not curves.held_out:
        raise RunError(f"{path}: no bits/dim in it yet (no training or held-out rows); nothing to plot")
    return curves


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def _names(runs: list[Path]) -> list[str]:
    """Each run's directory name, or its whole path where two runs share a name."""
    names = [r.resolve().name for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def draw(curves: list[Curves]) -> bytes:
    """The 2x2 figure of `curves` as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    # a Figure on its own Agg canvas, not pyplot: no window, and the caller's backend is left alone
    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for row, (kind, title) in enumerate((("held_out", "held-out bits/dim"), ("train", "training bits/dim"))):
        for col, (x, xlabel) in enumerate(((0, "optimizer step"), (1, "wall-clock minutes"))):
            ax = axes[row][col]
            for c, color in zip(curves, colors):
                points = getattr(c, kind)
                if not points:
                    continue
                xs, ys = [p[x] for p in points], [p[2] for p in points]
                label = c.name
                if kind == "held_out" and c.split:
                    label += f" ({c.split}, {c.images} images)" if c.images else f" ({c.split})"
                ax.plot(xs, ys, color=color, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
                best = min(range(len(ys)), key=ys.__getitem__)
                ax.plot([xs[best]], [ys[best]], marker="*", markersize=12, color=color, linestyle="none")
                ax.annotate(f"{ys[best]:.4f}", (xs[best], ys[best]), textcoords="offset points", xytext=(4, 6),
                            color=color, fontsize=9, fontweight="bold")
            values = [p[2] for c in curves for p in getattr(c, kind) if p[2] > 0]
            if values and max(values) > 10 * min(values):  # a long run falls from 8 to ~0.1: keep the end legible
                ax.set_yscale("log")
                plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.2, not 2 x 10^-1
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
                ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))  # labels that do not crowd
            ax.set_xlabel(xlabel)
            ax.set_ylabel(title)
            ax.grid(True, alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no rows yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    fig.suptitle("bits/dim (lower is better; the star marks each run's best)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Draw the curves of `runs` into the PNG `out` (written atomically) -> {"out", "runs": [{"run",
    "best_eval_bpd", "best_train_bpd", "steps"}]}. Raises RunError for a run without metrics and
    when `out` cannot be written."""
    paths = [Path(r) for r in runs]
    curves = [read_curves(p, name) for p, name in zip(paths, _names(paths))]
    out = Path(out)
    if out.is_dir():
        raise RunError(f"--out {out} is a directory; name the PNG file to write, e.g. {out / 'curves.png'}")
    try:
        atomic_write(out, draw(curves))
    except OSError as exc:
        raise RunError(f"cannot write {out}: {exc.strerror or exc}") from None

    def best(points):
        return min(p[2] for p in points) if points else None

    return {
        "out": str(out),
        "runs": [
            {"run": str(p), "best_eval_bpd": best(c.held_out), "best_train_bpd": best(c.train),
             "steps": max(q[0] for q in c.train + c.held_out)}
            for p, c in zip(paths, curves)
        ],
    }


def refresh_curves(run: str | os.PathLike) -> Path:
    """Redraw RUN/curves.png from RUN/metrics.jsonl (the trainer, at each evaluation)."""
    path = Path(run) / "curves.png"
    atomic_write(path, draw([read_curves(run)]))
    return path
