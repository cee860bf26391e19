"""The ``bayesfake`` command: each subcommand hands its arguments to one module's own command line.

    bayesfake info [NAME_OR_PATH ...]                   the detectors: training data, input size, version, metrics
    bayesfake train CONFIG [--resume] [--set k=v ...]   train any detector (python -m train.train)
    bayesfake search CONFIG --grid k=v1,v2 ... --out T  hyper-parameter search scored on validation (train.hpsearch)
    bayesfake evaluate MODEL_DIR --split test [--export hub_models/NAME]   calibrate on val, report (train.evaluate)
    bayesfake export MODEL_DIR OUT_DIR [--version X.Y.Z] [--push]          Hub repo folder (hub_models.export)
    bayesfake serve [--models a,b] [--torch-threads N]  the Space on http://127.0.0.1:7860 (space.app)
    bayesfake build-space OUT_DIR [--models a,b]        a pushable Space folder (space.build)
    bayesfake evidence FILE ...                         provenance read from the files themselves (evidence)
    bayesfake score SOURCE --out results.parquet [--detectors a,b] [--num-samples T] [--no-evidence]
                                                        score a folder or data set into parquet, resumable
                                                        (bayesfake.score); split across processes with
                                                        accelerate launch --multi_gpu --num_processes N -m bayesfake
                                                        score ... (CPU-only machines too: gloo) or torchrun
    bayesfake study CONFIG [--set k=v ...]              the backbone x classifier study, resumable (train.study)

``bayesfake SUBCOMMAND --help`` shows the options of each.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from pathlib import Path

# subcommand -> (module whose main(argv) runs it, one line of help)
COMMANDS = {
    "train": ("train.train", "train a detector from a YAML config (from scratch, fine-tuned or a frozen-backbone head)"),
    "search": ("train.hpsearch", "hyper-parameter grid search, scored on validation"),
    "evaluate": ("train.evaluate", "calibrate on validation, measure on a held-out split, optionally export"),
    "export": ("hub_models.export", "write a Hub repo folder (weights, code, golden outputs, card); --push publishes"),
    "serve": ("space.app", "start the Space (Gradio page and API) on the detectors"),
    "build-space": ("space.build", "write a pushable Space folder with the chosen detectors"),
    "evidence": ("evidence.__main__", "read provenance evidence (C2PA, IPTC, generator parameters, EXIF, watermark)"),
    "score": ("bayesfake.score", "score an image folder or data set with the detectors into a parquet file (resumable, "
              "distributed under accelerate launch)"),
    "study": ("train.study", "the backbone x classifier study (frozen backbones, classical heads, cross-data-set "
              "tests), resumable; writes its results table and heatmaps"),
}
HEADLINE_METRICS = (("cls/acc", "acc"), ("cal/ece", "ECE"), ("sc/auroc_entropy", "err-det AUROC"))


def detector_info(name_or_path: str) -> dict:
    """What a user needs to choose a detector, read from its config.json alone (nothing is loaded)."""
    from hub_models.hub import resolve

    folder = resolve(name_or_path)
    config = json.loads((folder / "config.json").read_text())
    metrics = config.get("metrics") or {}
    size = config.get("image_size")
    return {
        "name": str(name_or_path),
        "folder": str(folder),
        "version": config.get("release_version") or "unreleased",
        "training_data": config.get("training_domain") or "not stated",
        "input_size": f"{size}x{size}",
        "training_image_size": config.get("source_image_size") or size,
        "backbone": config.get("backbone"),
        "head": config.get("head"),
        "num_samples": config.get("num_samples"),
        "metrics": {label: metrics[key] for key, label in HEADLINE_METRICS if key in metrics},
    }


def info(argv: list[str]) -> None:
    from hub_models.hub import RELEASED_REPO_IDS

    parser = argparse.ArgumentParser(prog="bayesfake info", description="the detectors, from their configs")
    parser.add_argument("detectors", nargs="*", help="repo ids or folders (default: every released detector)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = [detector_info(name) for name in (args.detectors or RELEASED_REPO_IDS)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| detector | version | input | metrics (test) | training data |")
    print("|---|---|---|---|---|")
    for row in rows:
        metrics = ", ".join(f"{label} {value:.4f}" for label, value in row["metrics"].items()) or "not measured"
        print(f"| {Path(row['name']).name} | {row['version']} | {row['input_size']} (trained on "
              f"{row['training_image_size']} px) | {metrics} | {row['training_data']} |")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bayesfake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("info", help="the detectors: training data, input size, version, headline metrics", add_help=False)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "info":
        return info(rest)
    if command not in COMMANDS:
        parser.parse_args([command])  # argparse's own "invalid choice" error, listing the commands
    run = importlib.import_module(COMMANDS[command][0]).main
    prog = f"bayesfake {command}"
    sys.argv[0] = prog  # usage lines of the parsers that take their name from the program
    # Modules that record their command (in a model card) take it as prog, so it reads as the user typed it.
    result = run(rest, prog=prog) if "prog" in inspect.signature(run).parameters else run(rest)
    if isinstance(result, int) and not isinstance(result, bool):  # an exit status (evidence)
        raise SystemExit(result)


if __name__ == "__main__":
    main()
