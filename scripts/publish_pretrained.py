"""Publish a trained run as a pretrained model of the package: imagetx/pretrained/NAME/.

    python scripts/publish_pretrained.py NAME RUN --command "imagetx train --config ..." --commit SHA
        [--source-model NAME_OR_PATH] [--dest imagetx/pretrained] [--device cpu]

Exports RUN (`imagetx export`), measures exact bits/dim on the whole test split and on its first
1000 images (`imagetx eval-bpd`, fp32), and with --source-model the chain-rule total of a
super-resolution model; writes these, the training command, the commit the run was trained at,
its steps and hours and this machine's CPU into config.json's "provenance", and rewrites the model
card with them. The folder appears whole or not at all, and an existing NAME is never replaced:
remove it first to publish again. A run directory that a trainer still holds is refused (its
newest checkpoint is not its last yet), and it is held while it is published. Prints the
provenance as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from pathlib import Path

FIRST = 1000  # the test images the package's test re-measures (tests/storage/test_pretrained.py)


def measure(export_dir: Path, device: str, limit: int | None = None, source_model: str | None = None) -> dict:
    from imagetx.eval_bpd import EvalConfig, run

    return run(EvalConfig(checkpoint=export_dir, split="test", limit=limit, device=device, precision="fp32",
                          source_model=source_model))


def publish(name: str, run_dir: str, command: str, commit: str, dest: Path, device: str = "cpu",
            source_model: str | None = None) -> dict:
    from contextlib import nullcontext

    from imagetx.errors import RunError
    from imagetx.system.lock import RunLock

    final = dest / name
    if final.exists():
        raise SystemExit(f"error: {final} exists; remove it to publish {name} again")
    held = RunLock(run_dir) if Path(run_dir).is_dir() else nullcontext()
    try:
        with held:  # no trainer writes the run while it is measured
            return _publish(name, run_dir, command, commit, dest, device, source_model)
    except RunError as exc:
        raise SystemExit(f"error: {exc}; publish it when training has ended") from None


def _publish(name: str, run_dir: str, command: str, commit: str, dest: Path, device: str,
             source_model: str | None) -> dict:
    from imagetx.export import export, model_card
    from imagetx.storage.export_format import CARD, CONFIG
    from imagetx.system.cpu import cpu_description

    final = dest / name
    work = dest / f".{name}.publishing-{os.getpid()}"
    try:
        export(run_dir, work)
        full = measure(work, device)
        first = measure(work, device, limit=FIRST)
        meta = json.loads((work / CONFIG).read_text())
        minutes = meta["training"].get("minutes")
        prov = {
            "command": command, "commit": commit, "cpu": cpu_description(),
            "hours": round(minutes / 60, 3) if minutes is not None else None,
            "date": datetime.date.today().isoformat(),
            "test": {k: full[k] for k in ("bpd", "split", "images", "dataset")},
            "test_first": {k: first[k] for k in ("bpd", "split", "images")},
        }
        if source_model is not None:
            chain = measure(work, device, source_model=source_model)
            prov["chain_rule"] = {"source_model": source_model, "bpd": chain["chain_bpd"],
                                  "source_bpd": chain["source_bpd"], "images": chain["images"]}
        meta["provenance"] = prov
        (work / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        (work / CARD).write_text(model_card(meta, name))
        os.rename(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return prov


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="the pretrained model's name, e.g. fashion-mnist")
    ap.add_argument("run", help="the run directory (its newest checkpoint) or a checkpoint file")
    ap.add_argument("--command", required=True, help="the command that trained the run")
    ap.add_argument("--commit", required=True, help="the commit the run was trained at")
    ap.add_argument("--source-model", help="super-resolution: the input's own model, for the chain-rule total")
    ap.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "imagetx" / "pretrained")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    prov = publish(args.name, args.run, args.command, args.commit, args.dest, args.device, args.source_model)
    json.dump(prov, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
