"""Candidates for the full-size detector compared on out-of-fold predictions of wild train only (wild test is never
read): for each candidate (backbone, layout, hidden layer, dropout, extra CIFAKE images), MC-Dropout heads trained
with each group (a generator, or Urban100) left out as ``train.fullsize`` trains them, then the leave-one-group-out
check of calibration (``train.group_transfer``) at several reject levels. Every image is taken as in domain here
(the gate's out-of-fold scores cost a Gaussian fit per fold; ``train.fullsize`` adds them for the chosen candidate).

    OMP_NUM_THREADS=1 python benchmarks/fullsize_oof_candidates.py lite0,whole_centre,256,0.5 \
        lite0,whole_centre,256,0.5,cifake4000 [--alphas 0.10,0.07,0.06,0.05] [--out runs/fullsize-candidates]

Each candidate's out-of-fold sampled logits are kept in ``--out`` (resumable: a finished candidate is read back).
Backbone features come from ``train.wild.view_features``'s cache (``python -m train.fullsize`` fills it); a CIFAKE
extra (cifakeN: N CIFAKE train images, half of each class) is seen as the processor sees a 32 px image, upscaled:
all views alike, one backbone pass each. The CIFAKE images only join the fitting part of every fold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub_models import BayesFakeConfig, BayesFakeDetector  # noqa: E402
from train.features import load_backbone_weights  # noqa: E402
from train.fullsize import fold_heads, fold_names, group_folds, out_of_fold_predictions  # noqa: E402
from train.group_transfer import transfer_check  # noqa: E402
from train.prediction import Predictions  # noqa: E402
from train.wild import WILD, layout_features, load_wild, view_features, view_processor  # noqa: E402

BACKBONES = {"lite0": ("tf_efficientnet_lite0", 224, "tf_efficientnet_lite0.in1k.safetensors"),
             "lite2": ("tf_efficientnet_lite2", 260, "tf_efficientnet_lite2.in1k.safetensors")}
CIFAKE = WILD.parent / "cifake" / "data"
BASE_CONFIG = Path(__file__).resolve().parent.parent / "train/configs/fullsize/wild-effnetlite0-multiview.yaml"


def detector(backbone: str, dropout: float) -> BayesFakeDetector:
    name, size, weights = BACKBONES[backbone]
    cfg = yaml.safe_load(BASE_CONFIG.read_text())
    model = BayesFakeDetector(BayesFakeConfig(**{**cfg["model"], "backbone": name, "image_size": size,
                                                 "dropout": dropout})).eval()
    load_backbone_weights(model, WILD.parent.parent / "weights" / weights)
    return model


@torch.no_grad()
def cifake_features(model, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features of n CIFAKE train images (n / 2 per class, seeded) through the full-size processor."""
    table = pq.read_table(CIFAKE / "train-00000-of-00004.parquet", columns=["image", "label"]).to_pydict()
    labels = np.asarray(table["label"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.choice(np.flatnonzero(labels == c), n // 2, replace=False) for c in (0, 1)])
    processor = view_processor(model.config)
    parts = []
    for start in tqdm(range(0, len(pick), 32), desc="CIFAKE features", mininterval=10.0):
        batch = [table["image"][i]["bytes"] for i in pick[start:start + 32]]
        parts.append(model.backbone(processor(batch)["pixel_values"][:, 0]).float().numpy())  # all views alike
    return np.concatenate(parts), labels[pick]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", nargs="+", help="backbone,layout,hidden(0 = linear),dropout[,cifakeN]")
    parser.add_argument("--alphas", default="0.10,0.08,0.07,0.06,0.05,0.04")
    parser.add_argument("--out", default="runs/fullsize-candidates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = yaml.safe_load(BASE_CONFIG.read_text())
    train = load_wild("train")
    folds = group_folds(train, cfg["spread_groups"], cfg["seed"])
    names = fold_names(train, folds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.candidates:
        backbone, layout, hidden, dropout, *extra = spec.split(",")
        path = out / (spec.replace(",", "_") + ".npz")
        if not path.is_file():
            model = detector(backbone, float(dropout))
            x = layout_features(view_features(model, train, "train"), layout)
            y = train.labels
            fitting = folds
            if extra:
                features, labels = cifake_features(model, int(extra[0].removeprefix("cifake")))
                added = len(x) + np.arange(len(labels))
                x, y = np.concatenate([x, features]), np.concatenate([y, labels])
                fitting = [(np.concatenate([fit, added]), held) for fit, held in folds]
            heads = fold_heads(model, x, y, fitting, [] if hidden == "0" else [int(hidden)], cfg)
            model.config.calibration_temperature = 1.0
            raw = out_of_fold_predictions(model, x, y, fitting, heads, keep_sample_logits=True)
            np.savez(path, sample_logits=raw.sample_logits)
        logits = np.load(path)["sample_logits"]
        zero = np.zeros(len(train))
        raw = Predictions(labels=train.labels, p_fake=zero, std_fake=zero, predictive_entropy=zero,
                          mutual_information=zero, expected_entropy=zero, num_samples=logits.shape[0],
                          sample_logits=logits)
        print(f"\n{spec}\n| alpha | answered | accuracy (answered) | worst group's accuracy (answered) | ECE | "
              "worst group's ECE | ROC-AUC | error-detection AUROC |\n|---|---|---|---|---|---|---|---|")
        for alpha in (float(a) for a in args.alphas.split(",")):
            c = transfer_check(raw, zero, names, alpha, cfg["delta"], cfg["seed"])
            print(f"| {alpha} | {c['answered']:.3f} | {c['answered_acc']:.3f} | {c['worst_group_answered_acc']:.3f} "
                  f"| {c['ece']:.3f} | {c['worst_group_ece']:.3f} | {c['auroc']:.3f} | "
                  f"{c['error_detection_auroc']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
