"""Reconstruction error of an autoencoder detector as an out-of-domain score (issue 15, item 6): AUROC of
``reconstruction_error`` for ../shared/data/wild (every image, positive) against the CIFAKE test split (negative).

    python benchmarks/bench_ae_reconstruction.py runs/ae-smoke/cifake-ae-mobilenetv2/final [--max-test 4000]
        [--wild ../shared/data/wild] [--batch-size 256] [--output FILE.json]

Both sets are decoded by the detector's own processor (wild from the original files, resized as at inference; CIFAKE
test through the run's recorded splits), and scored with ``model.reconstruct`` in eval mode. Prints the AUROC and the
median error of each set (and writes them as JSON with ``--output``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub_models import BayesFakeDetector, BayesFakeImageProcessor  # noqa: E402
from train.data import decode_images, raw_splits  # noqa: E402
from train.evaluate import evaluation_data, subsample  # noqa: E402
from train.offdomain import WILD  # noqa: E402


def reconstruction_errors(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """``reconstruction_error`` [N] of uint8 images [N, S, S, 3] at the detector's input size."""
    processor = BayesFakeImageProcessor.from_config(model.config)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="reconstruct", unit="batch"):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2)
        out.append(model.reconstruct(processor.normalize_uint8(batch))["reconstruction_error"].numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--max-test", type=int, default=4000, help="seeded subset of the CIFAKE test split")
    parser.add_argument("--wild", default=WILD)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--output", help="write the numbers here as JSON")
    args = parser.parse_args()
    model = BayesFakeDetector.from_pretrained(args.model_dir).eval()
    record_file = Path(args.model_dir) / "train_history.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    test_images, _ = subsample(*evaluation_data(model, record)["test"], args.max_test, 0)
    processor = BayesFakeImageProcessor.from_config(model.config)
    items = [item for split in raw_splits(args.wild).values() for item in split]
    (wild_images, _), skipped = decode_images(items, processor, "decode wild")
    if skipped:
        raise ValueError(f"{args.wild}: {skipped} images could not be decoded")
    cifake = reconstruction_errors(model, test_images, args.batch_size)
    wild = reconstruction_errors(model, wild_images, args.batch_size)
    scores = np.concatenate([wild, cifake])
    is_wild = np.concatenate([np.ones(len(wild)), np.zeros(len(cifake))])
    result = {"model": args.model_dir, "auroc_wild_vs_cifake_test": float(roc_auc_score(is_wild, scores)),
              "n_wild": len(wild), "n_cifake_test": len(cifake), "median_error_wild": float(np.median(wild)),
              "median_error_cifake_test": float(np.median(cifake))}
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
