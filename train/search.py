"""Grid search of a detector's hyper-parameters, scored on the validation split (never on test).

Each grid point is one ordinary training run (``train.trainer.train``, either kind of config) in ``ROOT/POINT``.
Its row holds the last epoch's validation accuracy and NLL, then what the released detector would output: the NLL and
ECE after its temperature is fitted on the same validation split (``calibrate_on_validation`` at the config's T).
Rows are sorted by that calibrated NLL. A finished point keeps its row in ``ROOT/POINT/search_row.json`` and is not
re-run, and an interrupted point resumes from its checkpoint, so an interrupted search goes on where it stopped.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import yaml

from train.calibration import calibrate_on_validation
from train.config import load_config
from train.trainer import find_checkpoint, train

SORT_KEY = "val/nll_calibrated"


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``KEY=V1,V2,...`` items -> {KEY: [V1, V2, ...]} with each value as a ``--set`` value (YAML)."""
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        if not values:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,...")
        # Values are YAML, so a list value keeps its commas: model.cnn_widths=[16,32,64],[32,64,128]
        grid[key] = [json.dumps(v) for v in yaml.safe_load(f"[{values}]")]
    return grid


def point_tag(point: dict[str, str]) -> str:
    return "_".join(f"{k.removeprefix('model.')}={v}" for k, v in point.items()).replace(" ", "").replace("/", "-")


def run_search(config_path: str | Path, grid: dict[str, list[str]], overrides: list[str] = (),
               root: str | Path | None = None, progress: bool = False) -> list[dict]:
    """Train every grid point of ``config_path`` (+ ``overrides``) in ``root`` (default runs/search/NAME); return the
    rows sorted by calibrated validation NLL."""
    rows = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        settings = [*overrides, *(f"{k}={v}" for k, v in point.items())]
        base = load_config(config_path, settings)
        out_dir = Path(root or Path("runs/search") / base.name) / point_tag(point)
        row_file = out_dir / "search_row.json"
        if row_file.is_file():
            rows.append(json.loads(row_file.read_text()))
            continue
        cfg = load_config(config_path, [*settings, f"out_dir={out_dir}"])
        result = train(cfg, resume=find_checkpoint(out_dir / "checkpoint") is not None, progress=progress)
        last = result.history[-1]
        calibrated = calibrate_on_validation(result.model, *result.val, progress=False)["calibration"]
        row = {**point, "val/acc": last["val/acc"], "val/nll": last["val/nll"],
               "val/nll_calibrated": calibrated["val_nll_after"], "val/ece_calibrated": calibrated["val_ece_after"],
               "temperature": calibrated["temperature"], "train_seconds": last["train_seconds"]}
        row_file.write_text(json.dumps(row, indent=1) + "\n")
        print(json.dumps(row))
        rows.append(row)
    return sorted(rows, key=lambda r: r[SORT_KEY])


def write_table(rows: list[dict], out: Path, title: str, command: str) -> None:
    """The rows as a Markdown table in ``out``, with a .json twin beside it."""
    keys = list(rows[0])
    lines = [f"# {title}", "", f"Command: `{command}`", "", "Scored on the validation split carved from train.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
