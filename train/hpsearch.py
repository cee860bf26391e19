"""Grid search of a detector's hyper-parameters, scored on the validation split (never on test).

    python -m train.hpsearch train/configs/cifake-vi-bcnn.yaml --grid kl_weight=0.1,1 model.prior_sigma=0.1,1 \
        --set max_train=8000 epochs=1 --out train/results/hpsearch-vi.md

Each grid point is one ordinary training run (``train.train``) in ``runs/search/NAME/POINT``; a finished point is not
re-run, so an interrupted search resumes where it stopped. The table (Markdown + JSON) is sorted by validation NLL.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import yaml

from train.train import TrainConfig, train


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        if not values:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,...")
        # Values are YAML, so a list value keeps its commas: model.cnn_widths=[16,32,64],[32,64,128]
        grid[key] = [json.dumps(v) for v in yaml.safe_load(f"[{values}]")]
    return grid


def run_search(config_path: str, grid: dict[str, list[str]], overrides: list[str], root: Path) -> list[dict]:
    rows = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        tag = "_".join(f"{k.removeprefix('model.')}={v}" for k, v in point.items()).replace(" ", "")
        out_dir = root / tag
        cfg = TrainConfig.from_file(config_path, [*overrides, *(f"{k}={v}" for k, v in point.items()),
                                                  f"out_dir={out_dir}"])
        history_file = out_dir / "history.json"
        if not history_file.is_file():
            train(cfg, resume=(out_dir / "checkpoint.pt").is_file())
        history = json.loads(history_file.read_text())
        last = history["history"][-1]
        rows.append({**point, "val/acc": last["val/acc"], "val/nll": last["val/nll"],
                     "train_seconds": history["train_seconds"]})
    return sorted(rows, key=lambda r: r["val/nll"])


def write_table(rows: list[dict], out: Path, title: str, command: str) -> None:
    keys = list(rows[0])
    lines = [f"# {title}", "", f"Command: `{command}`", "", "Scored on the validation split carved from train.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides shared by all points")
    parser.add_argument("--out", required=True, help="Markdown results table (a .json twin is written beside it)")
    args = parser.parse_args(argv)
    name = TrainConfig.from_file(args.config).name
    rows = run_search(args.config, parse_grid(args.grid), args.set, Path("runs/search") / name)
    command = "python -m train.hpsearch " + " ".join(argv if argv is not None else sys.argv[1:])
    write_table(rows, Path(args.out), f"Hyper-parameter search: {name}", command)
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
