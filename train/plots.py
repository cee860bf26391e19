"""The evaluation report's plots, each written as one PNG (matplotlib figures without pyplot: Agg, no global state)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, roc_curve

from train.metrics import ECE_BINS, UNCERTAINTIES, risk_coverage
from train.prediction import Predictions

CLASS_NAMES = ("REAL", "FAKE")


def save_figure(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS):
    """(bin centres, mean confidence, accuracy, count) of the non-empty equal-width confidence bins."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    filled = count > 0
    mean_conf = np.bincount(index, weights=confidence, minlength=n_bins)[filled] / count[filled]
    accuracy = np.bincount(index, weights=correct, minlength=n_bins)[filled] / count[filled]
    centres = (edges[:-1] + edges[1:])[filled] / 2
    return centres, mean_conf, accuracy, count[filled]


def plot_reliability(preds: Predictions, ece: float, path: Path) -> None:
    confidence = np.maximum(preds.p_fake, 1.0 - preds.p_fake).astype(np.float64)
    correct = (preds.predicted(0.5) == preds.labels).astype(np.float64)
    centres, mean_conf, accuracy, count = reliability_bins(confidence, correct)
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    width = 1.0 / ECE_BINS
    ax.bar(centres, accuracy, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(centres, mean_conf - accuracy, bottom=accuracy, width=width, edgecolor="tab:red", color="tab:red",
           alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    for x, y, n in zip(centres, accuracy, count):
        ax.annotate(str(n), (x, y), ha="center", va="bottom", fontsize=6)
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence (top-label probability)", ylabel="accuracy",
           title=f"Reliability ({ECE_BINS} bins), ECE = {ece:.4f}")
    ax.legend(loc="upper left")
    save_figure(fig, path)


def plot_risk_coverage(preds: Predictions, threshold: float, path: Path) -> None:
    wrong = preds.wrong(threshold)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for field, label in UNCERTAINTIES.values():
        coverage, risk = risk_coverage(getattr(preds, field), wrong)
        ax.plot(coverage, risk, label=f"{label} (AURC {risk.mean():.4f})")
    # The oracle rejects exactly the errors first: the best any uncertainty score can do.
    coverage, risk = risk_coverage(wrong.astype(np.float64), wrong)
    ax.plot(coverage, risk, "k:", label=f"oracle (AURC {risk.mean():.4f})")
    ax.set(xlabel="coverage (fraction of images kept)", ylabel="risk (error rate on kept images)", xlim=(0, 1),
           title="Risk-coverage (keep the least uncertain first)")
    ax.legend()
    save_figure(fig, path)


def plot_uncertainty_hist(preds: Predictions, threshold: float, path: Path) -> None:
    wrong = preds.wrong(threshold)
    entropy = preds.predictive_entropy
    bins = np.linspace(0.0, max(math.log(2), float(entropy.max())), 31)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for mask, label, color in ((~wrong, "correct", "tab:green"), (wrong, "wrong", "tab:red")):
        if mask.any():
            ax.hist(entropy[mask], bins=bins, density=True, alpha=0.5, color=color, label=f"{label} (n={mask.sum()})")
    ax.set(xlabel="predictive entropy (nats)", ylabel="density", title="Predictive entropy: correct vs wrong")
    ax.legend()
    save_figure(fig, path)


def plot_confusion_matrix(matrix: list[list[int]], threshold: float, path: Path) -> None:
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=CLASS_NAMES).plot(ax=ax, colorbar=False,
                                                                               values_format="d")
    ax.set_title(f"Confusion matrix (threshold {threshold:.3f})")
    save_figure(fig, path)


def plot_roc(preds: Predictions, threshold: float, auc: float, path: Path) -> None:
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    if len(np.unique(preds.labels)) == 2:
        fpr, tpr, _ = roc_curve(preds.labels, preds.p_fake)
        ax.plot(fpr, tpr, label=f"ROC (AUROC {auc:.4f})")
        predicted = preds.predicted(threshold).astype(bool)
        fake = preds.labels == 1
        ax.plot(predicted[~fake].mean(), predicted[fake].mean(), "o", color="tab:red",
                label=f"threshold {threshold:.3f}")
    ax.plot([0, 1], [0, 1], "k--", label="chance")
    ax.set(xlabel="false positive rate (REAL called FAKE)", ylabel="true positive rate (FAKE caught)",
           title="ROC of P(FAKE)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    save_figure(fig, path)


def plot_feature_pca(features: np.ndarray, preds: Predictions, path: Path, title: str = "",
                     max_points: int = 4000, seed: int = 0) -> None:
    """The backbone features in their first two principal components, coloured by true label, by P(FAKE) and by
    predictive entropy: where the classes overlap, and whether the uncertain images sit there."""
    from sklearn.decomposition import PCA

    keep = np.random.default_rng(seed).permutation(len(features))[:max_points]
    xy = PCA(n_components=2, random_state=seed).fit_transform(np.asarray(features)[keep])
    fig = Figure(figsize=(15, 4.6))
    panels = [(preds.labels[keep], "true label (0 REAL, 1 FAKE)", "coolwarm"),
              (preds.p_fake[keep], "P(FAKE)", "coolwarm"),
              (preds.predictive_entropy[keep], "predictive entropy (nats)", "viridis")]
    for i, (colour, label, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        points = ax.scatter(xy[:, 0], xy[:, 1], c=colour, cmap=cmap, s=3, alpha=0.6, linewidths=0)
        fig.colorbar(points, ax=ax, label=label)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_title(label)
    fig.suptitle(title or f"PCA of the backbone features ({len(keep)} images)")
    save_figure(fig, path)


def write_plots(metrics: dict, preds: Predictions, out_dir: Path, features: np.ndarray | None = None,
                pca_title: str = "") -> list[str]:
    """Write every plot into ``out_dir``; return the file names. With the backbone ``features`` the predictions came
    from (a frozen backbone's cache), their PCA is drawn too."""
    threshold = metrics["meta/threshold"]
    plots = {
        "reliability.png": lambda path: plot_reliability(preds, metrics["cal/ece"], path),
        "risk_coverage.png": lambda path: plot_risk_coverage(preds, threshold, path),
        "uncertainty_hist.png": lambda path: plot_uncertainty_hist(preds, threshold, path),
        "confusion_matrix.png": lambda path: plot_confusion_matrix(metrics["cls/confusion_matrix"], threshold, path),
        "roc.png": lambda path: plot_roc(preds, threshold, metrics["cls/auroc"], path),
    }
    if features is not None:
        plots["feature_pca.png"] = lambda path: plot_feature_pca(features, preds, path, title=pca_title)
    for name, draw in plots.items():
        draw(out_dir / name)
    return list(plots)

