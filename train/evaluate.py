"""Calibrate a trained detector on validation, then measure it on a held-out split and write the report.

    python -m train.evaluate MODEL_DIR [--data ../shared/data/cifake] [--split test] [--out DIR] [--export OUT_DIR]
        [--num-samples T] [--max-eval N] [--val-fraction 0.05] [--seed 0] [--command "..."]

On validation (carved from train exactly as training did: same ``--val-fraction`` and ``--seed``) it fits the
temperature, the decision threshold on P(FAKE) and the reject entropy, and stores them in the model's config. On the
requested split it measures classification, calibration and uncertainty metrics (namespaced ``cls/``, ``cal/``,
``sc/``), and writes ``report.json``, ``report.md`` and PNG plots. ``--export`` then writes the calibrated model as a
complete Hub repo folder with the report and plots in its card.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # pyplot-free figures render with Agg and keep no global state
from sklearn.metrics import ConfusionMatrixDisplay, log_loss, roc_auc_score, roc_curve
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_confusion_matrix,
    binary_f1_score,
    binary_precision,
    binary_recall,
    multiclass_calibration_error,
)
from tqdm.auto import tqdm

from hub_models.image_processing_bayesfake import BayesFakeImageProcessor
from hub_models.modeling_bayesfake import sampling_rng
from train.calibration import choose_reject_entropy, choose_thresholds, fit_temperature

ECE_BINS = 15
REJECT_PERCENTS = (0, 5, 10, 20)
# Uncertainty scores compared in the error-detection metrics and plots: metric suffix -> (Predictions field, label).
UNCERTAINTIES = {
    "std": ("std_fake", "std of P(FAKE)"),
    "entropy": ("predictive_entropy", "predictive entropy (total)"),
    "mi": ("mutual_information", "mutual information (epistemic)"),
}
NAMESPACE_TITLES = {
    "cls": "Classification (at the decision threshold)",
    "cal": "Calibration of the predictive probabilities",
    "sc": "Uncertainty and selective classification (errors at the decision threshold)",
    "meta": "Run",
}
CLASS_NAMES = ("REAL", "FAKE")


# ----------------------------------------------------------------------------------------------------------------------
# Prediction


@dataclass
class Predictions:
    """Monte Carlo predictions of a detector on N labelled images (numpy arrays, [N] unless noted)."""

    labels: np.ndarray  # int64, 0 REAL / 1 FAKE
    p_fake: np.ndarray  # mean predictive P(FAKE)
    std_fake: np.ndarray  # std of P(FAKE) over the T samples
    predictive_entropy: np.ndarray  # total uncertainty, nats
    mutual_information: np.ndarray  # epistemic part
    expected_entropy: np.ndarray  # aleatoric part
    num_samples: int
    sample_logits: np.ndarray | None = None  # raw sampled logits [T, N, 2] before temperature, only when asked for

    def __len__(self) -> int:
        return len(self.labels)

    def predicted(self, threshold: float) -> np.ndarray:
        """Predicted labels: FAKE when P(FAKE) >= threshold (the detector's own rule)."""
        return (self.p_fake >= threshold).astype(np.int64)

    def wrong(self, threshold: float) -> np.ndarray:
        return self.predicted(threshold) != self.labels


def as_nchw_uint8(images) -> torch.Tensor:
    """uint8 images [N, H, W, 3] or [N, 3, H, W] (numpy or torch) -> a [N, 3, H, W] uint8 tensor (a view, no copy)."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8 or tensor.dim() != 4:
        raise ValueError(f"images must be uint8 [N, H, W, 3] or [N, 3, H, W]; got {tensor.dtype} "
                         f"{tuple(tensor.shape)}")
    if tensor.shape[1] != 3 and tensor.shape[-1] == 3:
        tensor = tensor.permute(0, 3, 1, 2)
    if tensor.shape[1] != 3:
        raise ValueError(f"images must have 3 colour channels; got shape {tuple(tensor.shape)}")
    return tensor


def is_features(inputs) -> bool:
    """Float [N, D] arrays are backbone features (a frozen backbone's cache); anything else is images."""
    return getattr(inputs, "ndim", 0) == 2 and not np.issubdtype(np.asarray(inputs[:1]).dtype, np.integer)


def raw_sample_logits(model, inputs: torch.Tensor, num_samples: int, seed: int, features: bool = False) -> torch.Tensor:
    """The [T, B, 2] logits behind ``model(inputs, num_samples, seed=seed)`` (or ``model.forward_features``), before
    the temperature. Same seeded RNG and same sampling switch as the forward pass: exactly the samples it averaged."""
    stochastic = model.config.stochastic
    t = num_samples if stochastic else 1
    with sampling_rng(seed, None, inputs.device):
        if features:
            return model.sample_head_logits(inputs, inputs.shape[0], t, stochastic=stochastic)
        return model.sample_logits(inputs, t, stochastic=stochastic)


def predict(model, images_uint8, labels, num_samples: int | None = None, batch_size: int = 512, seed: int = 0,
            progress: bool = True, keep_sample_logits: bool = False) -> Predictions:
    """Monte Carlo predictions of ``model`` (eval mode, T = ``num_samples``, default the config's) on uint8 images,
    or on float [N, D] backbone features (a frozen backbone's cache, run through ``model.forward_features``).

    Batch ``i`` is sampled with seed ``seed + i``: repeatable, and images in different batches get different draws;
    features give the same draws as the images they came from. ``keep_sample_logits`` also returns the raw sampled
    logits (what temperature fitting needs).
    """
    features = is_features(images_uint8)
    inputs = torch.as_tensor(np.asarray(images_uint8, dtype=np.float32)) if features else as_nchw_uint8(images_uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    num_samples = num_samples or model.config.num_samples
    model.eval()
    processor = BayesFakeImageProcessor.from_config(model.config)
    device = next(model.parameters()).device
    fields = ("p_fake", "std_fake", "predictive_entropy", "mutual_information", "expected_entropy", "sample_logits")
    columns = {name: [] for name in fields}
    starts = range(0, len(inputs), batch_size)
    with torch.no_grad():
        for index, start in enumerate(tqdm(starts, desc="predict", unit="batch", disable=not progress)):
            if features:
                batch = inputs[start:start + batch_size].to(device)
                out = model.forward_features(batch, num_samples=num_samples, seed=seed + index)
            else:
                batch = processor.normalize_uint8(inputs[start:start + batch_size].to(device))
                out = model(batch, num_samples=num_samples, seed=seed + index)
            columns["p_fake"].append(out.probs[:, 1])
            columns["std_fake"].append(out.std[:, 1])
            columns["predictive_entropy"].append(out.predictive_entropy)
            columns["mutual_information"].append(out.mutual_information)
            columns["expected_entropy"].append(out.expected_entropy)
            if keep_sample_logits:
                logits = raw_sample_logits(model, batch, num_samples, seed + index, features)
                columns["sample_logits"].append(logits.expand(num_samples, *logits.shape[1:]))
    arrays = {name: torch.cat(parts, dim=1 if name == "sample_logits" else 0).float().cpu().numpy()
              for name, parts in columns.items() if parts}
    return Predictions(labels=labels, num_samples=num_samples, **arrays)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


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
        "cal/nll": float(log_loss(preds.labels, p_fake, labels=[0, 1])),
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


# ----------------------------------------------------------------------------------------------------------------------
# Plots (each writes one PNG)


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


# ----------------------------------------------------------------------------------------------------------------------
# Report


def json_safe(value):
    """NaN -> None (JSON has no NaN; export then leaves undefined metrics out), recursively; numpy -> Python."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: dict, header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{key}` | {format_value(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    metrics = report["metrics"]
    parts = [
        f"# Evaluation report: {report['name']}",
        f"Dataset {report['dataset']}, split `{report['split']}`: {metrics['meta/n']} images, "
        f"T = {metrics['meta/num_samples']} Monte Carlo samples, decision threshold on P(FAKE) = "
        f"{metrics['meta/threshold']:.4f}.",
        "## Thresholds on P(FAKE) (chosen on validation)",
        markdown_table(report["thresholds"], ("rule", "threshold")),
    ]
    for namespace, title in NAMESPACE_TITLES.items():
        rows = {k: v for k, v in metrics.items() if k.split("/")[0] == namespace}
        if rows:
            parts += [f"## {title}", markdown_table(rows, ("metric", "value"))]
    described = {"name", "dataset", "split", "thresholds", "metrics", "plots"}
    for key, value in report.items():
        if key not in described:
            parts += [f"## {key}", markdown_table(value, ("key", "value")) if isinstance(value, dict)
                      else format_value(value)]
    parts += ["## Plots", *(f"![{Path(p).stem}]({p})" for p in report["plots"])]
    return "\n\n".join(parts) + "\n"


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


def write_report(metrics: dict, preds: Predictions, out_dir: str | Path, name: str, extra: dict | None = None,
                 features: np.ndarray | None = None) -> dict:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out_dir``; return the report dict.

    The report holds ``name``, ``dataset``, ``split``, ``thresholds`` (defaults: CIFAKE, test, the metrics' threshold;
    ``extra`` overrides them and adds keys), ``metrics`` (NaN written as null) and ``plots`` (file names in out_dir).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "name": name,
        "dataset": "CIFAKE",
        "split": "test",
        "thresholds": {"chosen": metrics["meta/threshold"]},
        **(extra or {}),
        "metrics": metrics,
    }
    report["plots"] = write_plots(metrics, preds, out, features, pca_title=f"{name}: {report['split']} features")
    report = json_safe(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    return report


# ----------------------------------------------------------------------------------------------------------------------
# The whole flow


def calibrate_on_validation(model, images, labels, num_samples: int | None = None, batch_size: int = 512,
                            seed: int = 0, reject_rate: float = 0.10, threshold_rule: str = "f1_optimal",
                            progress: bool = True) -> dict:
    """Fit temperature, threshold and reject entropy on validation and store them in ``model.config``.

    Returns a summary: the fitted values, every candidate threshold, and validation NLL / ECE before and after.
    """
    raw = predict(model, images, labels, num_samples, batch_size, seed, progress, keep_sample_logits=True)
    before = calibration_metrics(raw)
    temperature_before = model.config.calibration_temperature
    model.config.calibration_temperature = fit_temperature(raw.sample_logits, raw.labels)
    # Re-predict through the model itself: what is measured is what the tempered detector outputs.
    calibrated = predict(model, images, labels, num_samples, batch_size, seed, progress)
    after = calibration_metrics(calibrated)
    thresholds = choose_thresholds(calibrated, rule=threshold_rule)
    model.config.threshold = thresholds["chosen"]
    model.config.reject_entropy = choose_reject_entropy(calibrated, reject_rate=reject_rate)
    return {
        "thresholds": thresholds,
        "calibration": {
            "temperature": model.config.calibration_temperature,
            "temperature_before": temperature_before,
            "threshold_rule": threshold_rule,
            "reject_entropy": model.config.reject_entropy,
            "reject_rate_target": reject_rate,
            "val_n": len(calibrated),
            "val_nll_before": before["cal/nll"],
            "val_nll_after": after["cal/nll"],
            "val_ece_before": before["cal/ece"],
            "val_ece_after": after["cal/ece"],
        },
    }


def calibrate_and_evaluate(model, splits: dict, out_dir: str | Path, num_samples: int | None = None,
                           split: str = "test", name: str = "bayesfake", dataset: str = "CIFAKE",
                           batch_size: int = 512, seed: int = 0, reject_rate: float = 0.10,
                           threshold_rule: str = "f1_optimal", progress: bool = True) -> dict:
    """Calibrate ``model`` on ``splits["val"]`` (its config is updated), evaluate it on ``splits[split]`` and write the
    report into ``out_dir``; return the report dict. ``splits`` maps split names to (uint8 images, int64 labels)."""
    num_samples = num_samples or model.config.num_samples
    summary = calibrate_on_validation(model, *splits["val"], num_samples, batch_size, seed, reject_rate,
                                      threshold_rule, progress)
    preds = predict(model, *splits[split], num_samples, batch_size, seed, progress)
    metrics = compute_metrics(preds, model.config.threshold)
    extra = {"dataset": dataset, "split": split, **summary}
    inputs = splits[split][0]
    return write_report(metrics, preds, out_dir, name, extra, features=inputs if is_features(inputs) else None)


def subsample(images: np.ndarray, labels: np.ndarray, max_n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of at most ``max_n`` images (all of them when ``max_n`` is None)."""
    if max_n is None or len(labels) <= max_n:
        return images, labels
    keep = np.sort(np.random.default_rng(seed).choice(len(labels), size=max_n, replace=False))
    return images[keep], labels[keep]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="folder written by save_pretrained (training's final/) or a Hub folder")
    parser.add_argument("--data", default="../shared/data/cifake", help="dataset folder or id (train.data)")
    parser.add_argument("--split", default="test", help="split to evaluate on (calibration always uses val)")
    parser.add_argument("--num-samples", type=int, help="Monte Carlo samples T (default: the config's)")
    parser.add_argument("--out", help="report folder (default: eval_SPLIT next to MODEL_DIR)")
    parser.add_argument("--export", help="write the calibrated model as a Hub repo folder here")
    parser.add_argument("--name", help="report / model name (default: the export or model folder name)")
    parser.add_argument("--dataset-name", default="CIFAKE", help="dataset name shown in the report and card")
    parser.add_argument("--command", help="command recorded in the model card (default: this command)")
    parser.add_argument("--max-eval", type=int, help="evaluate on a seeded random subset of this many images "
                                                    "per split (quick smoke runs)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="must match training's")
    parser.add_argument("--seed", type=int, default=0, help="split seed (must match training's) and sampling seed")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--reject-rate", type=float, default=0.10, help="share of validation sent to human review")
    args = parser.parse_args(argv)

    from transformers import AutoModel

    from train.data import load_splits

    model = AutoModel.from_pretrained(args.model_dir, trust_remote_code=True)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    splits = load_splits(args.data, val_fraction=args.val_fraction, seed=args.seed, size=model.config.image_size)
    splits = {key: subsample(*splits[key], args.max_eval, args.seed) for key in ("val", args.split)}
    model_dir = Path(args.model_dir).resolve()
    out_dir = Path(args.out) if args.out else model_dir.parent / f"eval_{args.split}"
    name = args.name or Path(args.export or model_dir).name
    report = calibrate_and_evaluate(model, splits, out_dir, args.num_samples, split=args.split, name=name,
                                    dataset=args.dataset_name, batch_size=args.batch_size, seed=args.seed,
                                    reject_rate=args.reject_rate)
    print(json.dumps(report["metrics"], indent=2))
    print(f"wrote {out_dir / 'report.md'}")
    if args.export:
        from hub_models.export import export_detector

        command = args.command or shlex.join(["python", "-m", "train.evaluate", *argv])
        folder = export_detector(model, args.export, report=report, plots=[out_dir / p for p in report["plots"]],
                                 command=command)
        print(f"exported the calibrated model to {folder}")
    return report


if __name__ == "__main__":
    main()
