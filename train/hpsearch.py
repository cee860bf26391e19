"""Grid search of a detector's hyper-parameters, scored on the validation split (never on test); any kind of config.

    python -m train.hpsearch train/configs/cifake-vi-bcnn.yaml --grid kl_weight=0.1,1 model.prior_sigma=0.1,1 \
        --set max_train=8000 epochs=1 --out train/results/hpsearch-vi.md
    python -m train.hpsearch train/configs/frozen/effnetlite0-vi-linear.yaml --grid kl_weight=0.1,0.5,1,2 \
        model.prior_sigma=0.5,1,2 --out train/results/hpsearch-effnetlite0-vi-linear.md

Each grid point is one ordinary training run in ``ROOT/POINT`` (default ``runs/search/NAME``); a finished point is not
re-run, so an interrupted search resumes where it stopped. The table (Markdown + JSON) is sorted by the validation NLL
after temperature scaling (see train.search).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from train.config import load_config
from train.search import parse_grid, run_search, write_table


def main(argv: list[str] | None = None, prog: str = "python -m train.hpsearch") -> list[dict]:
    """The command line; returns the table's rows. ``prog`` is how it was called (usage, and the table's command)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides shared by all points")
    parser.add_argument("--out", required=True, help="Markdown results table (a .json twin is written beside it)")
    parser.add_argument("--root", help="folder of the points' runs (default runs/search/NAME)")
    args = parser.parse_args(argv)
    name = load_config(args.config, args.set).name
    rows = run_search(args.config, parse_grid(args.grid), args.set, args.root)
    write_table(rows, Path(args.out), f"Hyper-parameter search: {name}", shlex.join([*shlex.split(prog), *argv]))
    print(Path(args.out).read_text())
    return rows


if __name__ == "__main__":
    main()
