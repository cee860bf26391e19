"""Heads on a frozen pretrained backbone, in one command: train, then calibrate, evaluate and export.

    python -m train.frozen train/configs/frozen/effnetlite0-mcd-mlp.yaml --split test --export hub_models/NAME
    python -m train.frozen CONFIG --grid model.dropout=0.1,0.3 --out train/results/hpsearch-NAME.md

A shortcut kept for the commands written before the trainers were merged: it runs ``python -m train.train CONFIG``
(a frozen-backbone config trains its head on cached features), then ``python -m train.evaluate OUT/final`` when
``--split`` or ``--export`` is given; with ``--grid`` it is ``python -m train.hpsearch``.
"""

from __future__ import annotations

import argparse
import sys

from train import evaluate, hpsearch
from train import train as train_cli
from train.config import load_config


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m train.frozen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML TrainConfig (train/configs/frozen/*.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--resume", action="store_true", help="continue the training from OUT/checkpoint")
    parser.add_argument("--split", help="evaluate on this split after calibrating on val (e.g. test)")
    parser.add_argument("--export", help="write the calibrated detector as a Hub repo folder here")
    parser.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="hyper-parameter search instead of one run")
    parser.add_argument("--out", help="search results table (Markdown; a .json twin is written beside it)")
    args = parser.parse_args(argv)
    sets = ["--set", *args.set] if args.set else []
    if args.grid:
        if not args.out:
            parser.error("--grid needs --out")
        hpsearch.main([args.config, "--grid", *args.grid, *sets, "--out", args.out])
        return
    train_cli.main([args.config, *sets, *(["--resume"] if args.resume else [])])
    if args.split or args.export:
        out, split = load_config(args.config, args.set).out, args.split or "test"
        evaluate.main([str(out / "final"), "--split", split, "--out", str(out / f"eval_{split}"),
                       *(["--export", args.export] if args.export else [])])


if __name__ == "__main__":
    main()
