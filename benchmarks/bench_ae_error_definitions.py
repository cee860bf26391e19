"""Which reconstruction error tells wild images from CIFAKE (issue 15, item 6): several definitions of an autoencoder
detector's error, each scored as an out-of-domain score.

    python benchmarks/bench_ae_error_definitions.py runs/ae-smoke/cifake-ae-mobilenetv2/final \
        [--max-cifake 4000] [--output FILE.json]

The definition is chosen on wild TRAIN (positive) against the run's CIFAKE VALIDATION split (negative), among those the
model implements (``RECONSTRUCTION_METRICS``: l1, highpass, perceptual, perceptual_deep, perceptual_mahalanobis;
scripts/release.sh passes the choice to ``train.evaluate --reconstruction-metric``); the chosen one and every other
are then reported on wild train + test against CIFAKE TEST, never used to choose. Definitions, all on the detector's
reconstruction ``r`` and its target ``t`` (the image as the detector sees it, in [0, 1]):

- ``l1``: mean |r - t| at the input size (what ``reconstruction_error`` was at the smoke runs);
- ``l2``: mean (r - t)^2;
- ``l1_source``: mean |r - t| after both are shrunk (area) to the training images' own side (CIFAKE: 32 px);
- ``ssim``: 1 - SSIM(r, t) (train.losses.ssim_per_image);
- ``perceptual``: the LPIPS-style distance of train.losses.PerceptualDistance (frozen ImageNet MobileNetV2: an extra
  backbone pass on r and on t);
- ``highpass``: mean |HP(r) - HP(t)|, HP(x) = x - GaussianBlur3x3(x) (the detail the decoder fails to rebuild);
- ``perceptual_deep``: the model's own ``reconstruction_error`` under that metric: ``perceptual`` on its encoder's 3rd
  and 4th stages, each stage's per-position distance pooled by its 90th percentile over space instead of the mean;
- ``perceptual_mahalanobis``: the model's own ``reconstruction_error`` under that metric: per channel of its encoder's
  first 4 stages, log mean squared feature error of r against t; the Mahalanobis distance of that vector to the
  training images' (a Gaussian fitted by ``train.reconstruction_density.fit_reconstruction_density`` on a seeded
  ``--fit-images`` subset of the run's CIFAKE TRAIN split, never on validation, test or wild);
- ``target_highpass``: mean |HP(t)| alone, no autoencoder at all: how much of the signal is only "this image has
  detail at the input size that an upsampled 32 px CIFAKE image lacks".

Each wild image is also scored as ``wild shrunk``: resized to the training images' side first (32 px), then to the
input size as CIFAKE images are, so a definition that only reads the resampling trace shows it there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub_models import BayesFakeDetector  # noqa: E402
from hub_models.configuration_bayesfake import RECONSTRUCTION_METRICS  # noqa: E402
from train.data import decode_images, decode_processor, raw_splits  # noqa: E402
from train.evaluate import read_run_record, recorded_splits, subsample  # noqa: E402
from train.losses import PerceptualDistance, ssim_per_image  # noqa: E402
from train.reconstruction_density import DENSITY_TRAIN_IMAGES, fit_reconstruction_density  # noqa: E402
from train.offdomain import WILD  # noqa: E402

DEFINITIONS = ("l1", "l2", "l1_source", "ssim", "perceptual", "highpass", "target_highpass", "perceptual_deep",
               "perceptual_mahalanobis")
PERCEPTUAL_WEIGHTS = "../shared/weights/mobilenetv2_100.in1k.safetensors"


def highpass(x: torch.Tensor) -> torch.Tensor:
    return x - gaussian_blur(x, kernel_size=3, sigma=1.0)


def model_metric(model, metric: str, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The model's own ``reconstruction_error`` [B] under ``metric`` (its config's metric put back after)."""
    saved = model.config.reconstruction_metric
    model.config.reconstruction_metric = metric
    try:
        return model.reconstruction_score(reconstruction, target)
    finally:
        model.config.reconstruction_metric = saved


def error_definitions(model, perceptual: PerceptualDistance, images: np.ndarray, batch_size: int,
                      desc: str) -> dict[str, np.ndarray]:
    """Every definition [N] for uint8 images [N, S, S, 3] at the detector's input size."""
    from hub_models import BayesFakeImageProcessor

    processor = BayesFakeImageProcessor.from_config(model.config)
    source = model.config.training_image_size
    out = {name: [] for name in DEFINITIONS}
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2)
        with torch.no_grad():
            rec = model.reconstruct(processor.normalize_uint8(batch))
            r, t = rec["reconstruction"], rec["target"]
            diff = r - t
            out["l1"].append(diff.abs().flatten(1).mean(1))
            out["l2"].append(diff.pow(2).flatten(1).mean(1))
            small = F.adaptive_avg_pool2d(r, source) - F.adaptive_avg_pool2d(t, source)
            out["l1_source"].append(small.abs().flatten(1).mean(1))
            out["ssim"].append(1.0 - ssim_per_image(r, t))
            out["perceptual"].append(perceptual(r, t))
            out["highpass"].append((highpass(r) - highpass(t)).abs().flatten(1).mean(1))
            out["target_highpass"].append(highpass(t).abs().flatten(1).mean(1))
            out["perceptual_deep"].append(model_metric(model, "perceptual_deep", r, t))
            # fitted in main() on CIFAKE train
            out["perceptual_mahalanobis"].append(model_metric(model, "perceptual_mahalanobis", r, t))
    return {name: torch.cat(values).float().numpy() for name, values in out.items()}


def decode_wild(model, wild: str, shrink_first: bool) -> dict[str, np.ndarray]:
    """Wild train and test at the detector's input size (as the processor serves them), or shrunk to the training
    images' side first and brought back to the input size as CIFAKE images are."""
    side = model.config.training_image_size if shrink_first else 0
    processor = decode_processor(model.config, side)
    out = {}
    for split, items in raw_splits(wild).items():
        (images, _), skipped = decode_images(items, processor, f"decode wild {split}")
        if skipped:
            raise ValueError(f"{wild}: {skipped} images could not be decoded")
        if shrink_first:  # up to the input size exactly as the CIFAKE splits are decoded (same processor path)
            up = decode_processor(model.config, 0)
            images = np.stack([up.to_rgb_uint8(image) for image in images])
        out[split] = images
    return out


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    scores = np.concatenate([positive, negative])
    return float(roc_auc_score(np.r_[np.ones(len(positive)), np.zeros(len(negative))], scores))


def flagged_at(positive: np.ndarray, negative_val: np.ndarray, keep: float = 0.99) -> float:
    """Share of ``positive`` above the threshold that lets ``keep`` of the CIFAKE validation images pass."""
    return float(np.mean(positive > np.quantile(negative_val, keep)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--max-cifake", type=int, default=4000, help="seeded subset of CIFAKE val and of test each")
    parser.add_argument("--wild", default=WILD)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--fit-images", type=int, default=DENSITY_TRAIN_IMAGES,
                        help="seeded subset of CIFAKE train the perceptual_mahalanobis density is fitted on")
    parser.add_argument("--output", help="write the numbers here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = BayesFakeDetector.from_pretrained(args.model_dir).eval()
    _, record = read_run_record(args.model_dir)
    splits = recorded_splits(record, decode_processor(model.config, 0))
    fit_reconstruction_density(model, splits["train"][0], max_images=args.fit_images, batch_size=args.batch_size)
    cfg = model.config
    perceptual = PerceptualDistance("mobilenetv2_100", PERCEPTUAL_WEIGHTS, cfg.image_mean, cfg.image_std).eval()
    scores = {}
    for split in ("val", "test"):
        images, _ = subsample(*splits[split], args.max_cifake, 0)
        scores[f"cifake_{split}"] = error_definitions(model, perceptual, images, args.batch_size, f"cifake {split}")
    for shrink in (False, True):
        for split, images in decode_wild(model, args.wild, shrink).items():
            name = f"wild_{split}" + ("_shrunk" if shrink else "")
            scores[name] = error_definitions(model, perceptual, images, args.batch_size, name)
    rows = {}
    for name in DEFINITIONS:
        s = {key: value[name] for key, value in scores.items()}
        wild_all = np.r_[s["wild_train"], s["wild_test"]]
        rows[name] = {
            "choose: wild train vs CIFAKE val": auroc(s["wild_train"], s["cifake_val"]),
            "report: wild train+test vs CIFAKE test": auroc(wild_all, s["cifake_test"]),
            "report: wild test only vs CIFAKE test": auroc(s["wild_test"], s["cifake_test"]),
            "report: wild shrunk to source side vs CIFAKE test": auroc(np.r_[s["wild_train_shrunk"],
                                                                          s["wild_test_shrunk"]], s["cifake_test"]),
            "wild flagged at 99% CIFAKE val passing": flagged_at(wild_all, s["cifake_val"]),
            "median CIFAKE test": float(np.median(s["cifake_test"])),
            "median wild": float(np.median(wild_all)),
        }
    chosen = max(RECONSTRUCTION_METRICS, key=lambda n: rows[n]["choose: wild train vs CIFAKE val"])
    result = {"model": args.model_dir, "chosen (on wild train vs CIFAKE val)": chosen,
              "n": {key: len(next(iter(value.values()))) for key, value in scores.items()}
              | {"cifake_train (perceptual_mahalanobis fit)": int(model.reconstruction_density.fitted_on)},
              "definitions": rows}
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
