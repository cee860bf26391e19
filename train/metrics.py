"""Metrics of a detector's predictions, namespaced: ``cls/`` classification (at the decision threshold), ``cal/``
calibration of the probabilities, ``sc/`` uncertainty and selective classification, ``meta/`` the run.

Computed with torchmetrics and scikit-learn where they compute them. ``nll`` is the project's one negative
log-likelihood: training validation, search scoring, calibration summaries and reports all use it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_confusion_matrix,
    binary_f1_score,
    binary_precision,
    binary_recall,
    multiclass_calibration_error,
)

from train.prediction import Predictions

ECE_BINS = 15
REJECT_PERCENTS = (0, 5, 10, 20)
# Uncertainty scores compared in the error-detection metrics and plots: metric suffix -> (Predictions field, label).
UNCERTAINTIES = {
    "std": ("std_fake", "std of P(FAKE)"),
    "entropy": ("predictive_entropy", "predictive entropy (total)"),
    "mi": ("mutual_information", "mutual information (epistemic)"),
}
# The probability of the true class is floored here before its log (see ``nll``).
NLL_FLOOR = 1e-7


def nll(labels, p_fake) -> float:
    """Mean negative log-likelihood (nats) of ``labels`` (0 REAL / 1 FAKE) under P(FAKE) = ``p_fake``, with the
    probability of the true class floored at ``NLL_FLOOR`` = 1e-7 (one confidently wrong image costs at most 16.1).

    The committed search tables (train/results/) were scored with scikit-learn's ``log_loss`` on P(FAKE) clipped to
    [1e-7, 1 - 1e-7]; this is the same number except where the true class has p > 1 - 1e-7, where it is smaller by
    less than 1e-7 per image (and exactly 0 for perfect predictions).
    """
    labels = np.asarray(labels)
    p_fake = np.asarray(p_fake, dtype=np.float64)
    p_true = np.where(labels == 1, p_fake, 1.0 - p_fake)
    return float(-np.mean(np.log(np.maximum(p_true, NLL_FLOOR))))


def accuracy(labels, p_fake, threshold: float = 0.5) -> float:
    """Share of images whose label the rule "FAKE when P(FAKE) >= threshold" gets right."""
    return float(np.mean((np.asarray(p_fake) >= threshold) == np.asarray(labels)))


def auroc(targets: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of ``scores`` for the positive targets; NaN where undefined (only one class present)."""
    if len(np.unique(targets)) < 2:
        return math.nan
    return float(roc_auc_score(targets, scores))


def binary_scores(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the FAKE class from hard predictions (torchmetrics)."""
    pred, target = torch.from_numpy(predicted), torch.from_numpy(labels)
    return {
        "acc": float(binary_accuracy(pred, target)),
        "precision": float(binary_precision(pred, target)),
        "recall": float(binary_recall(pred, target)),
        "f1": float(binary_f1_score(pred, target)),
    }


def classification_metrics(preds: Predictions, threshold: float) -> dict:
    predicted = preds.predicted(threshold)
    metrics = {f"cls/{k}": v for k, v in binary_scores(predicted, preds.labels).items()}
    metrics["cls/auroc"] = auroc(preds.labels, preds.p_fake)
    # Hard labels are passed (not probabilities) because torchmetrics thresholds with ">", the detector with ">=".
    matrix = binary_confusion_matrix(torch.from_numpy(predicted), torch.from_numpy(preds.labels))
    metrics["cls/confusion_matrix"] = matrix.tolist()  # [[tn, fp], [fn, tp]]
    return metrics


def two_class_probs(preds: Predictions) -> torch.Tensor:
    p_fake = torch.from_numpy(preds.p_fake).double()
    return torch.stack([1.0 - p_fake, p_fake], dim=1)


def calibration_metrics(preds: Predictions) -> dict:
    """Top-label ECE (confidence = max(P(REAL), P(FAKE)), correct = argmax right), NLL, and binary Brier score.

    These judge the probabilities themselves, so the ECE's predictions are the argmax (0.5), not the chosen threshold.
    """
    ece = multiclass_calibration_error(two_class_probs(preds), torch.from_numpy(preds.labels), num_classes=2,
                                       n_bins=ECE_BINS, norm="l1")
    p_fake = preds.p_fake.astype(np.float64)
    return {
        "cal/ece": float(ece),
        "cal/nll": nll(preds.labels, p_fake),
        "cal/brier": float(np.mean((p_fake - preds.labels) ** 2)),  # binary Brier: in [0, 1]
    }


def risk_coverage(uncertainty: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Risk-coverage curve: keep the k least uncertain images, k = 1..N; return (coverage k/N, their error rate)."""
    order = np.argsort(uncertainty, kind="stable")
    kept = np.arange(1, len(order) + 1)
    return kept / len(order), np.cumsum(wrong[order]) / kept


def aurc(uncertainty: np.ndarray, wrong: np.ndarray) -> float:
    """Area under the risk-coverage curve (mean risk over all coverages; lower is better)."""
    return float(risk_coverage(uncertainty, wrong)[1].mean())


def uncertainty_gap(uncertainty: np.ndarray, wrong: np.ndarray) -> float:
    """Mean uncertainty on wrong predictions minus on correct ones (NaN when either group is empty)."""
    if wrong.all() or not wrong.any():
        return math.nan
    return float(uncertainty[wrong].mean() - uncertainty[~wrong].mean())


def least_uncertain(uncertainty: np.ndarray, reject_percent: float) -> np.ndarray:
    """Indices of the images kept after rejecting the ``reject_percent`` % most uncertain."""
    keep = len(uncertainty) - int(round(len(uncertainty) * reject_percent / 100))
    return np.argsort(uncertainty, kind="stable")[:keep]


def selective_metrics(preds: Predictions, threshold: float) -> dict:
    """How well each uncertainty flags the errors, and accuracy / F1 after rejecting the most uncertain images."""
    wrong = preds.wrong(threshold)
    metrics = {"sc/aurc": aurc(preds.predictive_entropy, wrong)}
    # Error detection: wrong predictions are the positives, the uncertainty is the score.
    for suffix, (field, _) in UNCERTAINTIES.items():
        metrics[f"sc/auroc_{suffix}"] = auroc(wrong.astype(np.int64), getattr(preds, field))
    for suffix, (field, _) in UNCERTAINTIES.items():
        metrics[f"sc/gap_{suffix}"] = uncertainty_gap(getattr(preds, field), wrong)
    predicted = preds.predicted(threshold)
    for percent in REJECT_PERCENTS:
        kept = least_uncertain(preds.predictive_entropy, percent)
        scores = binary_scores(predicted[kept], preds.labels[kept])
        metrics[f"sc/acc@reject{percent}"] = scores["acc"]
        metrics[f"sc/f1@reject{percent}"] = scores["f1"]
    return metrics


def compute_metrics(preds: Predictions, threshold: float) -> dict:
    """Flat dict of namespaced metrics (``cls/``, ``cal/``, ``sc/``, ``meta/``); NaN where a metric is undefined."""
    return {
        **classification_metrics(preds, threshold),
        **calibration_metrics(preds),
        **selective_metrics(preds, threshold),
        "meta/n": len(preds),
        "meta/threshold": float(threshold),
        "meta/num_samples": int(preds.num_samples),
    }

