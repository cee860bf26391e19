"""Cost of the autoencoder detector's T-sample predictive against one deterministic pass (issue 15's target: <= 1.2x;
the encoder and the decoder run once per image, only the head is sampled), and what the decoder adds to the encoder.

    python benchmarks/bench_autoencoder.py [--config train/configs/autoencoder/cifake-ae-mobilenetv2.yaml]
        [--batch 64] [--samples 30] [--repeats 11] [--threads 1] [--set model.reconstruction_metric=perceptual ...]

In eval mode under ``torch.no_grad``, after a warm-up, on random pixels (the cost does not depend on the weights): per
repeat, back to back, ``det`` = ``model(x, num_samples=1, stochastic=False)`` (encoder, decoder, one head pass),
``pred`` = ``model(x, num_samples=T)``, ``encoder`` = ``model.backbone(x)`` alone. Prints median times and the median
of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hub_models import BayesFakeDetector
from train.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="train/configs/autoencoder/cifake-ae-mobilenetv2.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys, as training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.set).model_config()
    model = BayesFakeDetector(config).eval()
    x = torch.randn(args.batch, 3, config.image_size, config.image_size)
    runs = {"det": lambda: model(x, num_samples=1, stochastic=False),
            "pred": lambda: model(x, num_samples=args.samples),
            "encoder": lambda: model.backbone(x)}
    times = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    ratio = statistics.median(p / d for p, d in zip(times["pred"], times["det"]))
    decoder = statistics.median(d / e for d, e in zip(times["det"], times["encoder"]))
    print(f"{config.backbone} {config.image_size}px decoder {config.decoder_widths} greyscale={config.greyscale} "
          f"reconstruction_metric={config.reconstruction_metric}, "
          f"batch {args.batch}, {args.threads} thread(s), {args.repeats} repeats")
    for name, values in times.items():
        print(f"  {name:8s} median {statistics.median(values) * 1000:8.1f} ms")
    print(f"  pred (T={args.samples}) / det: {ratio:.3f}   det / encoder alone: {decoder:.3f}")


if __name__ == "__main__":
    main()
