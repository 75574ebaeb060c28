"""`imagetx export`: a run's model as a folder in the convention models are shared in.

    DIR/model.safetensors   the bare model's weights (no DDP or torch.compile prefixes)
    DIR/config.json         {"format": "imagetx-export", "format_version", "imagetx_version", "step",
                             "model": ModelConfig, "data": DataConfig, "held_out", "training",
                             "weights_sha256" (checked at every load); a pretrained model's also
                             "provenance" (scripts/publish_pretrained.py)}
    DIR/README.md           a model card: what it is, the data set, held-out bits/dim with its split
                            and image count, training time and steps, the sample grid, commands
    DIR/samples.png         the run's newest sample grid (when it has one)

The folder is written beside its final name (.DIR.tmp-PID) and renamed into place: it appears
whole or not at all. imagetx.storage.export_format reads it back (`read_export`), so load_model,
sample, eval-bpd and superres take it like a checkpoint; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from imagetx.config import stored_config
from imagetx.errors import RunError
from imagetx.storage.checkpoint import load_checkpoint, resolve_checkpoint
from imagetx.storage.weights import model_from_checkpoint, weights_key
from imagetx.storage.export_format import CARD, CONFIG, EXPORT_FORMAT, EXPORT_VERSION, GRID, WEIGHTS, model_kind
from imagetx.system.atomic import remove_stale_temporaries
from imagetx.system.paths import file_sha256


# ---- writing -------------------------------------------------------------------------------------
def run_summary(run_dir: Path, step: int) -> dict:
    """What the run's metrics.jsonl says up to `step`: {"held_out": {bpd, split, images, step} or
    None, "minutes": wall-clock training minutes or None}."""
    from imagetx.plot import read_curves

    try:
        curves = read_curves(run_dir)
    except RunError:
        return {"held_out": None, "minutes": None}
    held = [p for p in curves.held_out if p[0] <= step]
    times = [p[1] for p in curves.train + curves.held_out if p[0] <= step]
    held_out = None
    if held:
        s, _, bpd = held[-1]
        held_out = {"bpd": bpd, "split": curves.split, "images": curves.images, "step": s, "dataset": curves.dataset}
    return {"held_out": held_out, "minutes": max(times) if times else None}


def newest_grid(run_dir: Path, step: int) -> Path | None:
    """The run's sample grid of the highest step up to `step` (RUN/samples/step-NNNNNNNN.png)."""
    grids = [(int(p.stem[5:]), p) for p in run_dir.glob("samples/step-*.png") if p.stem[5:].isdigit()]
    grids = sorted(g for g in grids if g[0] <= step)
    return grids[-1][1] if grids else None


def export(run: str | os.PathLike, out: str | os.PathLike, weights: str = "auto") -> dict:
    """Export a run (its newest checkpoint) or a checkpoint file to the folder `out`, which must
    not exist or be empty -> {"out", "checkpoint", "step", "files", "held_out", "weights"}. The
    weights are the ones `weights` names (storage.weights.weights_key: by default the moving average
    when the run kept one); config.json says which. Raises
    CheckpointError for an unusable checkpoint, RunError for a target that holds files or cannot
    be written."""
    from imagetx import __version__
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file; export into a new (or empty) directory")
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out} exists and is not empty; export into a new (or empty) directory")
    path = resolve_checkpoint(run)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path, weights=weights)  # checks the weights against the config
    which = "ema" if weights_key(ckpt, weights, path) == "ema" or ckpt.get("exported_weights") == "ema" else "trained"
    config = stored_config(ckpt, path)
    step = int(ckpt["step"])
    run_dir = path.parent.parent  # RUN/checkpoints/step-N.pt
    summary = run_summary(run_dir, step)
    train = config.get("train") or {}
    meta = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "imagetx_version": __version__,
        "step": step, "model": model.config.to_dict(), "data": config.get("data") or {"name": "unknown"},
        "held_out": summary["held_out"], "weights": which,
        "training": {
            "steps": step, "minutes": summary["minutes"],
            "images_per_step": (train["batch_size"] * train["grad_accum"]) if "batch_size" in train else None,
            "processes": ckpt.get("world_size"),
            **{k: train[k] for k in ("optimizer", "lr", "schedule", "precision", "seed", "ema") if k in train},
        },
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    grid = newest_grid(run_dir, step)
    if grid is not None:
        meta["samples_step"] = int(grid.stem[5:])
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # folders of exports that were killed half-way
        tmp.mkdir()
        # tensors that share storage (tied weights) are stored once each, contiguous, on the CPU
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(weights, tmp / WEIGHTS, metadata={"format": EXPORT_FORMAT, "step": str(step)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / WEIGHTS, 0o666 & ~umask)  # safetensors writes it 0600; readable like the other files
        meta["weights_sha256"] = file_sha256(tmp / WEIGHTS)  # read_export checks it at every load
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if grid is not None:
            shutil.copyfile(grid, tmp / GRID)
        (tmp / CARD).write_text(model_card(meta, out.name))
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"cannot write the export {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "checkpoint": str(path), "step": step,
            "files": sorted(p.name for p in out.iterdir()), "held_out": summary["held_out"], "weights": which}


def model_card(meta: dict, name: str) -> str:
    """README.md of an export (its config.json's `meta`): a model card in Markdown."""
    grid_step = meta.get("samples_step")
    m, data, held, tr = meta["model"], meta["data"], meta["held_out"], meta["training"]
    H, W = m["image_size"]
    what = [f"{m['attention']} attention", f"{m['n_layers']} layers", f"d_model {m['d_model']}",
            f"{m['output']} output", f"{meta['parameters'] / 1e6:.2f}M parameters"]
    kind = model_kind(m)
    details = ", ".join(f"{k} {v}" for k, v in data.items() if k not in ("name", "download", "num_workers") and v not in (None, False))
    lines = [
        f"# {name}: an Image Transformer ({kind}, {H}x{W}x{m['channels']})",
        "",
        f"An autoregressive Image Transformer (Parmar et al., 2018) trained with imagetx {meta['imagetx_version']}: "
        f"{', '.join(what)}. It gives exact likelihoods (bits/dim) and samples images sub-pixel by sub-pixel.",
        "",
        "## Data",
        "",
        f"Trained on **{data.get('name')}** ({details or 'default settings'}), at {H}x{W} with {m['channels']} channel(s)"
        + (f"; as read by imagetx: {held['dataset']}." if held and held.get("dataset") else ".")
        + f" The data set version is the one imagetx {meta['imagetx_version']} reads under that name.",
        "",
        "## Results",
        "",
    ]
    prov = meta.get("provenance")
    if prov:
        lines.append(f"Exact bits/dim on the whole `{prov['test']['split']}` split ({prov['test']['images']} images): "
                     f"**{prov['test']['bpd']:.4f}**; on its first {prov['test_first']['images']}: "
                     f"{prov['test_first']['bpd']:.4f} (an fp32 pass in eval mode, `imagetx eval-bpd`).")
        if prov.get("chain_rule"):
            c = prov["chain_rule"]
            lines.append(f"With the input's own model `{c['source_model']}`, the chain-rule total over both resolutions: "
                         f"**{c['bpd']:.4f}** bits per target dimension.")
    elif held:
        lines.append(f"Held-out bits/dim: **{held['bpd']:.4f}** on the `{held['split']}` split "
                     f"({held['images']} images, step {held['step']}), an exact fp32 pass in eval mode.")
    else:
        lines.append("No held-out bits/dim were recorded by the run; measure them with `imagetx eval-bpd` (below).")
    minutes = f"{tr['minutes']:.1f} minutes" if tr.get("minutes") is not None else "unrecorded time"
    per_step = f", {tr['images_per_step']} images per step" if tr.get("images_per_step") else ""
    extra = ", ".join(f"{k} {tr[k]}" for k in ("optimizer", "lr", "schedule", "precision") if k in tr)
    lines += ["", "## Training", "", f"{tr['steps']} optimizer steps in {minutes}{per_step}" + (f" ({extra})." if extra else "."), ""]
    if prov:
        lines += [f"- command: `{prov['command']}`", f"- commit: {prov['commit']}", f"- CPU: {prov['cpu']}",
                  f"- hours: {prov['hours']:.2f}", f"- published: {prov['date']}",
                  f"- sha256 of {WEIGHTS}: `{meta['weights_sha256']}` (checked whenever it is loaded)", ""]
    if grid_step is not None:
        lines += ["## Samples", "", f"![samples]({GRID})", "", f"Drawn by the run at step {grid_step} (fixed seed).", ""]
    lines += ["## Use", "", "```bash", f"imagetx sample {name} --num 16 --out samples.png"]
    if m.get("source_size"):
        lines.append(f"imagetx superres {name} --dataset {data.get('name')} --num 8 --out superres")
    lines += [f"imagetx eval-bpd {name} --split test", "```", "", "```python", "from imagetx import load_model",
              "", f'model = load_model("{name}")  # reads model.safetensors and config.json; nothing is unpickled']
    if not m.get("source_size"):
        lines.append("images = model.sample(4)  # uint8 (4, H, W, C)")
    lines += ["```", "", "## Files", "",
              f"- `{WEIGHTS}`: the weights (safetensors)"
              + (f": the moving average of the trained weights (train.ema {tr.get('ema')})" if meta.get("weights") == "ema" else ""),
              f"- `{CONFIG}`: the model config, the data set it was trained on, held-out bits/dim and training facts",
              ""]
    return "\n".join(lines)
