"""Train a BayesFake detector from one config file (any kind: from scratch, fine-tuned, or a head on a frozen backbone).

    python -m train.train train/configs/cifake-mcdropout-cnn.yaml [--resume] [--set epochs=2 ...]
    python -m train.train train/configs/frozen/effnetlite0-mcd-mlp.yaml          # head on cached features
    accelerate launch -m train.train CONFIG      # several GPUs, unchanged

The config file holds a ``TrainConfig`` (train.config) whose ``model`` mapping is a ``BayesFakeConfig``. Checkpoints
(model, optimiser, every RNG, epoch, step, history) are written atomically to ``OUT/checkpoint`` every ``ckpt_every``
steps and at each epoch end; ``--resume`` continues from it with the same data order, so an interrupted run loses at
most ``ckpt_every`` steps, and a finished run extended by a warm-restart cycle (``lr_cycles``) goes on from its end.
The trained model lands in ``OUT/final`` as a complete Hub repo folder, with ``train_history.json`` (the run's record,
validation split included); then ``python -m train.evaluate OUT/final`` calibrates and measures it.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from train.config import load_config
from train.trainer import train


def main(argv: list[str] | None = None, prog: str = "python -m train.train") -> None:
    """The command line; ``prog`` is how it was called (shown in usage, recorded in the model card)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML TrainConfig (train/configs/*.yaml, train/configs/frozen/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys (model.KEY for the model config)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    result = train(cfg, resume=args.resume, command=shlex.join([*shlex.split(prog), *argv]))
    print(f"model written to {result.final}")


if __name__ == "__main__":
    main()
