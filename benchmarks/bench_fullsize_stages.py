"""Do a frozen backbone's early stages tell unseen generators apart better than its last layer? Measured where the
full-size detector may be chosen: leave-one-group-out predictions of wild train (each source or generator predicted by
a head that never saw it, BSDS500 dealt over the folds as ``train.fullsize`` does). Wild test is never read.

    python benchmarks/bench_fullsize_stages.py [--backbone tf_efficientnet_lite0] [--output FILE]

Why: every full-size candidate so far reads the backbone's last, pooled 1280 features (ImageNet semantics), and on
wild test they reach ROC-AUC 0.91 but only 80-83% accuracy, with an error ranking (AUROC 0.81-0.83) too weak to answer
80% at 90%. Traces of generation (upsampling, texture statistics) live in the early, high-resolution stages, which a
semantic head averages away. Per view, each stage's channel means and standard deviations (global pooling: any image
size) are compared with the last layer, alone and together, on the whole-image + centre views (``whole_centre``, the
released layout) and on five native-scale crops (``five_crop``: 224 px windows of the copy at most 512 px on a side,
not resized, where pixel-level traces survive).

Two heads per feature set: a logistic regression on standardised features (scikit-learn; C in a fixed grid, chosen by
the same leave-one-group-out ROC-AUC, the row shows the chosen one), and the released head type (MC Dropout, one hidden
layer of 256, T = 30, trained by ``train.fullsize``'s own functions). Probabilities as they come (no temperature).
Columns: ROC-AUC, accuracy at 0.5, ECE (15 bins), error-detection AUROC (the predictive entropy ranking the wrong
answers), accuracy among the 80% most confident, and the worst group's accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hub_models import BayesFakeConfig, BayesFakeDetector  # noqa: E402
from hub_models.configuration_bayesfake import VIEW_NAMES  # noqa: E402
from hub_models.modeling_bayesfake import entropy as binary_entropy  # noqa: E402
from train.data import default_cache_dir  # noqa: E402
from train.features import load_backbone_weights  # noqa: E402
from train.fullsize import fold_heads, group_folds, out_of_fold_predictions  # noqa: E402
from train.metrics import auroc, calibration_metrics  # noqa: E402
from train.prediction import Predictions  # noqa: E402
from train.wild import ALL_VIEWS, load_wild, view_processor  # noqa: E402

WEIGHTS = {"tf_efficientnet_lite0": (ROOT.parent / "shared/weights/tf_efficientnet_lite0.in1k.safetensors", 224),
           "tf_efficientnet_lite2": (ROOT.parent / "shared/weights/tf_efficientnet_lite2.in1k.safetensors", 260)}
C_GRID = (0.001, 0.01, 0.1)
COVERAGE = 0.8


def detector(backbone: str) -> BayesFakeDetector:
    weights, size = WEIGHTS[backbone]
    config = BayesFakeConfig(backbone=backbone, image_size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                             resample="bicubic", head="mc_dropout", view_layout="whole_centre", view_max_side=512)
    model = BayesFakeDetector(config).eval()
    load_backbone_weights(model, str(weights))
    return model


@torch.no_grad()
def stage_features(model, images: list[bytes], batch_images: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per image and view (the six of ``ALL_VIEWS``): the last layer's pooled features [N, 6, D] and every stage's
    channel means and standard deviations, concatenated [N, 6, S]. Cached by backbone and images (git-ignored)."""
    digest = hashlib.sha1(model.config.backbone.encode() + str(model.config.image_size).encode())
    for image in images:
        digest.update(hashlib.sha1(image).digest())
    path = default_cache_dir() / "wild_stages" / f"{digest.hexdigest()[:16]}.npz"
    if path.is_file():
        data = np.load(path)
        return data["last"], data["stages"]
    net = model.backbone.model
    processor = view_processor(model.config)
    last, stages = [], []
    for start in tqdm(range(0, len(images), batch_images), desc="stage features", unit="batch", mininterval=10.0):
        pixels = processor(images[start:start + batch_images])["pixel_values"]  # [b, 6, 3, S, S]
        b, k = pixels.shape[:2]
        final, intermediates = net.forward_intermediates(pixels.flatten(0, 1))
        last.append(net.forward_head(final, pre_logits=True).view(b, k, -1).numpy())
        pooled = [torch.cat([t.mean((2, 3)), t.std((2, 3))], 1) for t in intermediates]
        stages.append(torch.cat(pooled, 1).view(b, k, -1).numpy())
    last, stages = np.concatenate(last), np.concatenate(stages)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), last=last, stages=stages)
    os.replace(path.with_suffix(".tmp.npz"), path)
    return last, stages


def out_of_fold(features: np.ndarray, labels: np.ndarray, folds, c: float) -> np.ndarray:
    """P(FAKE) of every image from the logistic regression of the fold that held its group out."""
    p_fake = np.empty(len(labels))
    for fit, held in folds:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
        clf.fit(features[fit], labels[fit])
        p_fake[held] = clf.predict_proba(features[held])[:, 1]
    return p_fake


# The released full-size head (wild-effnetlite0-multiview 1.0.0): one hidden layer of 256, MC Dropout 0.3, T = 30,
# trained as train.fullsize trains it (its YAML's epochs, lr, weight decay and seed).
MCD_HEAD = {"hidden": [256], "epochs": 200, "lr": 0.001, "weight_decay": 0.001, "seed": 0}


def out_of_fold_mcdropout(model, features: np.ndarray, labels: np.ndarray, folds) -> np.ndarray:
    """Mean P(FAKE) over T = 30 samples of every image, from the MC-Dropout head of the fold that held its group out.
    The head is sized for ``features`` (the detector's pooled width is the last layer's; stage statistics are
    wider), through the same ``fold_heads`` / ``out_of_fold_predictions`` as the release."""
    model.backbone.num_features = features.shape[1]
    heads = fold_heads(model, features, labels, folds, MCD_HEAD["hidden"], MCD_HEAD)
    return out_of_fold_predictions(model, features, labels, folds, heads).p_fake.astype(np.float64)


def row_metrics(p_fake: np.ndarray, labels: np.ndarray, group: np.ndarray) -> dict:
    p = torch.from_numpy(p_fake)
    entropy = binary_entropy(torch.stack([1 - p, p], -1)).numpy()  # the model's own predictive entropy of P(FAKE)
    wrong = (p_fake >= 0.5) != labels
    zeros = np.zeros_like(p_fake)
    preds = Predictions(labels=labels, p_fake=p_fake, std_fake=zeros, predictive_entropy=entropy,
                        mutual_information=zeros, expected_entropy=entropy, num_samples=1)
    surest = np.argsort(entropy, kind="stable")[: int(round(COVERAGE * len(p)))]
    worst = min((1 - wrong[group == g].mean(), g) for g in sorted(set(group)))
    return {"auc": auroc(labels, p_fake), "acc": 1 - wrong.mean(), "ece": calibration_metrics(preds)["cal/ece"],
            "err_auc": auroc(wrong, entropy), "acc80": 1 - wrong[surest].mean(), "worst": worst}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", choices=sorted(WEIGHTS))
    parser.add_argument("--no-mcdropout", dest="mcdropout", action="store_false",
                        help="logistic regression rows only (the MC-Dropout rows train 8 heads per row)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results_fullsize_stages.md"))
    args = parser.parse_args(argv)
    started = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    train = load_wild("train")
    model = detector(args.backbone)
    last, stages = stage_features(model, train.images)
    group = np.asarray(train.group)
    folds = group_folds(train, spread_groups=["bsds500"], seed=0)  # BSDS500's photos dealt over the others' folds
    names = VIEW_NAMES[ALL_VIEWS]
    sets = {"last layer": lambda v: last[:, v].mean(1), "stages (mean, std)": lambda v: stages[:, v].mean(1),
            "last layer + stages": lambda v: np.concatenate([last[:, v].mean(1), stages[:, v].mean(1)], 1)}
    lines = [f"# Full-size features: last layer vs early stages ({args.backbone}), leave-one-group-out on wild train",
             "", f"`python benchmarks/bench_fullsize_stages.py --backbone {args.backbone}`", "",
             f"{len(train)} wild train images; each predicted by a logistic regression fitted without its source or "
             "generator (BSDS500 dealt over the folds). Wild test is not read. Heads: a logistic regression on "
             f"standardised features (C chosen in {list(C_GRID)} by this ROC-AUC), and the released head (MC Dropout, "
             "one hidden layer of 256, p = 0.3, T = 30, trained as train.fullsize trains it). Columns: ROC-AUC, "
             "accuracy at 0.5, ECE (15 bins), error-detection AUROC (entropy), accuracy among the "
             f"{COVERAGE:.0%} most confident, worst group's accuracy (a source or generator).",
             "", "| layout | features | dim | head | ROC-AUC | accuracy | ECE | error AUROC | acc. at 80% | "
             "worst group |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for layout in ("whole_centre", "five_crop"):
        views = [names.index(v) for v in VIEW_NAMES[layout]]
        for label, build in sets.items():
            features = build(views)
            best = max(((auroc(train.labels, out_of_fold(features, train.labels, folds, c)), c) for c in C_GRID))
            heads = {f"logistic, C = {best[1]}": out_of_fold(features, train.labels, folds, best[1])}
            if args.mcdropout:
                heads["MC-Dropout [256]"] = out_of_fold_mcdropout(model, features, train.labels, folds)
            for head, p_fake in heads.items():
                m = row_metrics(p_fake, train.labels, group)
                lines.append(f"| {layout} | {label} | {features.shape[1]} | {head} | {m['auc']:.3f} | {m['acc']:.1%} | "
                             f"{m['ece']:.3f} | {m['err_auc']:.3f} | {m['acc80']:.1%} | {m['worst'][1]} "
                             f"{m['worst'][0]:.1%} |")
                print(lines[-1], flush=True)
    lines += ["", f"Took {time.time() - started:.0f} s on {os.cpu_count()} CPU threads (features cached after the "
              "first run)."]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
