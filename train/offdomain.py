"""Stress test of a calibrated detector off its clean test set: laundered copies of it, and images from elsewhere.

For a CIFAKE detector: the CIFAKE test split clean, the same images laundered (``train.laundering``: JPEG 75 / 50,
down-up x0.5, centre crop 75%, blur; a seeded subset), and ``../shared/data/wild`` (real photos and 12 generators at
upload sizes, out of domain for every CIFAKE detector). Each set is decoded and resized exactly as at inference (the
detector's own processor), run at the detector's T, and reported as:

- ``cls/acc``, ``cal/ece``, ``sc/auroc_entropy`` (error detection) over every image;
- ``sc/coverage`` (share answered), ``sc/answered_acc`` / ``sc/answered_risk`` among the answered,
  ``ood/outside_share`` (the gate said "outside") and ``sc/review_share`` ("uncertain");
- against the clean test set: ``ood/auroc`` of the domain score, and ``ood/auroc_entropy`` of the predictive entropy
  (what a detector without a gate would have to rely on).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from hub_models.image_processing_bayesfake import BayesFakeImageProcessor
from train.data import decode_images, raw_splits
from train.domain import gate_images
from train.features import content_features, resize_uint8
from train.laundering import LAUNDERINGS, launder_images
from train.metrics import compute_metrics
from train.prediction import predict

WILD = "../shared/data/wild"
LAUNDER_IMAGES = 2000  # seeded subset of the clean test split laundered per kind
KEYS = ("cls/acc", "cal/ece", "sc/auroc_entropy", "sc/coverage", "sc/answered_acc", "sc/answered_risk",
        "sc/answered_n", "ood/outside_share", "sc/review_share", "meta/n")


def stress_sets(model, test_images: np.ndarray, test_labels: np.ndarray, wild: str | None = WILD,
                launder_images_n: int = LAUNDER_IMAGES, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{set name: (uint8 images at the detector's input size, labels[, the same at the domain gate's input size when
    the gate has its own extractor])}: "laundered/<kind>" for every
    ``LAUNDERINGS`` kind (on a seeded subset of ``launder_images_n`` test images, laundered at their stored size),
    and "wild" (train + test of ``wild``, decoded from the original files by the detector's processor)."""
    processor = BayesFakeImageProcessor.from_config(model.config)
    extractor_gate = getattr(model, "domain_gate", None) is not None and model.domain_gate.extractor is not None

    def entry(images, labels):  # + the gate's own input, resized from the same pixels, when it has an extractor
        return ((resize_uint8(processor, images), labels, gate_images(model, images)) if extractor_gate
                else (resize_uint8(processor, images), labels))

    test_labels = np.asarray(test_labels)
    sets = {}
    n = min(launder_images_n, len(test_labels))
    keep = np.sort(np.random.default_rng(seed).choice(len(test_labels), size=n, replace=False))
    for kind in LAUNDERINGS:
        sets[f"laundered/{kind}"] = entry(launder_images(test_images[keep], kind), test_labels[keep])
    if wild:
        items = [item for split in raw_splits(wild).values() for item in split]
        (images, labels), skipped = decode_images(items, processor, "decode wild")
        if skipped:
            raise ValueError(f"{wild}: {skipped} images could not be decoded")
        sets["wild"] = (images, labels)
        if extractor_gate:  # decoded a second time from the originals at the gate's size, as the processor does
            (domain_images, _), _ = decode_images(items, processor.domain_processor(), "decode wild (gate)")
            sets["wild"] = (images, labels, domain_images)
    return sets


def set_metrics(model, preds) -> dict:
    metrics = compute_metrics(preds, model.config.threshold)
    metrics.update(preds.answered_outcome(model))
    return {key: metrics[key] for key in KEYS}


def stress_report(model, sets: dict, clean, num_samples: int | None = None, seed: int = 0, batch_size: int = 256,
                  progress: bool = True, frozen_features: bool = False) -> dict:
    """{set name: metrics} for "clean" (the ``Predictions`` of the clean test split, computed by the caller) and every
    set of ``stress_sets``, with the domain AUROCs of each against clean (``ood/auroc`` from the gate's score, when
    the detector has one; ``ood/auroc_entropy`` always). ``frozen_features``: the detector is a head on a frozen
    backbone (no gate of its own extractor), so each set's features are computed once and cached for every head on
    that backbone (``train.features.content_features``)."""
    report = {"clean": set_metrics(model, clean)}
    for name, (images, labels, *domain) in sets.items():
        if frozen_features and not domain:
            inputs = content_features(model, images, name, progress)
        else:
            inputs = images
        preds = predict(model, inputs, labels, num_samples, batch_size, seed, progress,
                        domain_inputs=domain[0] if domain else None)
        report[name] = set_metrics(model, preds)
        targets = np.r_[np.zeros(len(clean)), np.ones(len(preds))]
        report[name]["ood/auroc_entropy"] = float(roc_auc_score(
            targets, np.r_[clean.predictive_entropy, preds.predictive_entropy]))
        if preds.domain_score is not None and clean.domain_score is not None:
            report[name]["ood/auroc"] = float(roc_auc_score(targets, np.r_[clean.domain_score, preds.domain_score]))
    return report


def stress_markdown(report: dict) -> str:
    """The report as a Markdown table, one row per set."""
    header = ("set", "n", "accuracy", "ECE", "error-det. AUROC", "answered", "acc. answered", "outside",
              "uncertain", "domain AUROC vs clean")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def pct(v):
        return "n/a" if v is None or v != v else f"{100 * v:.1f}%"

    def num(v):
        return "n/a" if v is None or v != v else f"{v:.3f}"

    for name, m in report.items():
        lines.append(f"| {name} | {m['meta/n']} | {pct(m['cls/acc'])} | {num(m['cal/ece'])} | "
                     f"{num(m['sc/auroc_entropy'])} | {pct(m['sc/coverage'])} | {pct(m['sc/answered_acc'])} | "
                     f"{pct(m['ood/outside_share'])} | {pct(m['sc/review_share'])} | {num(m.get('ood/auroc'))} |")
    return "\n".join(lines) + "\n"
