"""Does a detector's calibration carry over to a generator it never saw? A leave-one-group-out check of the
calibration itself, and the reject rule's level chosen so that it does.

``train.fullsize`` fits temperature, threshold, domain threshold and the Learn-then-Test reject rule on out-of-fold
predictions of wild train (each image predicted by a head that never saw its group). The rule's guarantee (at most
``alpha`` wrong among the answered, with probability >= 1 - ``delta``) holds for images exchangeable with those
calibration images; wild test has other sources and generators, and there release 1.0.0's alpha = 0.10 rule answered
14% wrongly. Here every group (a generator, or Urban100) is held out once more, now from the calibration: temperature,
threshold, domain threshold and rule are fitted on the other groups' out-of-fold predictions exactly as on all of them
(the same halves: one fits, the other certifies), then applied to the held-out group. What that group's images get
(answered share, accuracy among the answered, ECE) is what calibration does to a generator it never saw.
``choose_alpha`` takes the loosest ``alpha`` whose rule keeps every held-out group's answered accuracy at the target
while answering enough of them all.
"""

from __future__ import annotations

import numpy as np
import torch

from train.abstention import certify_reject_entropy
from train.calibration import calibration_halves, choose_thresholds, fit_temperature, mc_log_predictive
from train.domain import IN_DOMAIN_PASS
from train.metrics import auroc, calibration_metrics
from train.prediction import Predictions


def tempered(raw: Predictions, temperature: float) -> Predictions:
    """``raw`` (out-of-fold predictions with their sampled logits, made at temperature 1) as the detector outputs them
    at ``temperature``: P(FAKE) and predictive entropy of the tempered Monte Carlo predictive (the other fields
    are not needed here and are left as they were)."""
    if raw.sample_logits is None:
        raise ValueError("tempered needs predictions made with keep_sample_logits=True")
    log_pred = mc_log_predictive(torch.as_tensor(raw.sample_logits, dtype=torch.float64), temperature)
    pred = log_pred.exp()
    entropy = -(pred * log_pred).sum(-1)
    fields = {**vars(raw), "p_fake": pred[:, 1].numpy(), "predictive_entropy": entropy.numpy()}
    return Predictions(**fields)


def fit_calibration(raw: Predictions, scores: np.ndarray, index: np.ndarray, seed: int, alpha: float, delta: float,
                    threshold_rule: str) -> dict:
    """Temperature, threshold, domain threshold and reject entropy fitted on the images ``index`` as
    ``train.fullsize.calibrate_grouped`` fits them on all: a stratified half fits the first three, the other half
    certifies the rule (``reject_entropy`` None when nothing is certified)."""
    labels = raw.labels[index]
    half_fit, half_certify = (index[h] for h in calibration_halves(labels, seed))
    temperature = fit_temperature(raw.sample_logits[:, half_fit], raw.labels[half_fit])
    preds = tempered(raw, temperature)
    fit_part = Predictions(**{**vars(preds), "labels": preds.labels[half_fit], "p_fake": preds.p_fake[half_fit],
                              "sample_logits": None})
    threshold = choose_thresholds(fit_part, rule=threshold_rule)["chosen"]
    domain_threshold = float(np.quantile(scores[half_fit], IN_DOMAIN_PASS, method="higher"))
    inside = scores[half_certify] <= domain_threshold
    wrong = preds.wrong(threshold)[half_certify]
    rule = certify_reject_entropy(preds.predictive_entropy[half_certify][inside], wrong[inside], alpha, delta)
    return {"temperature": temperature, "threshold": threshold, "domain_threshold": domain_threshold,
            "reject_entropy": rule.reject_entropy}


def transfer_check(raw: Predictions, scores: np.ndarray, group: np.ndarray, alpha: float, delta: float,
                   seed: int = 0, threshold_rule: str = "f1_optimal") -> dict:
    """Each group of ``group`` (the held-out group of each image's fold) calibrated by what the other groups'
    out-of-fold predictions fit; ``scores`` are the out-of-fold domain scores. Returns the pooled outcome (ECE,
    ROC-AUC, error-detection AUROC, answered share, accuracy among the answered) and one row per group."""
    group = np.asarray(group)
    n = len(raw.labels)
    p_fake, entropy = np.empty(n), np.empty(n)
    wrong, answered = np.zeros(n, bool), np.zeros(n, bool)
    rows = []
    for name in sorted(set(group)):
        held = np.flatnonzero(group == name)
        fitted = fit_calibration(raw, scores, np.flatnonzero(group != name), seed, alpha, delta, threshold_rule)
        preds = tempered(raw, fitted["temperature"])
        p_fake[held], entropy[held] = preds.p_fake[held], preds.predictive_entropy[held]
        wrong[held] = preds.wrong(fitted["threshold"])[held]
        lam = fitted["reject_entropy"]
        answered[held] = (scores[held] <= fitted["domain_threshold"]) & (
            entropy[held] <= lam if lam is not None else False)
        part = answered[held]
        rows.append({"group": str(name), "n": int(len(held)), "temperature": fitted["temperature"],
                     "answered": float(part.mean()),
                     "answered_acc": float(1 - wrong[held][part].mean()) if part.any() else float("nan"),
                     "ece": calibration_metrics(_subset(raw, held, p_fake, entropy))["cal/ece"]})
    pooled = _subset(raw, np.arange(n), p_fake, entropy)
    return {
        "alpha": alpha, "delta": delta, "ece": calibration_metrics(pooled)["cal/ece"],
        "auroc": float(auroc(raw.labels, p_fake)), "error_detection_auroc": float(auroc(wrong, entropy)),
        "answered": float(answered.mean()),
        "answered_acc": float(1 - wrong[answered].mean()) if answered.any() else float("nan"),
        # a group with nothing answered has no accuracy among the answered (and no error there)
        "worst_group_answered_acc": min((r["answered_acc"] for r in rows if r["answered"] > 0), default=float("nan")),
        "worst_group_ece": float(max(r["ece"] for r in rows)), "groups": rows,
    }


def _subset(raw: Predictions, index: np.ndarray, p_fake: np.ndarray, entropy: np.ndarray) -> Predictions:
    """Predictions of the images ``index`` with the given P(FAKE) and entropy (for calibration_metrics)."""
    return Predictions(labels=raw.labels[index], p_fake=p_fake[index], std_fake=raw.std_fake[index],
                       predictive_entropy=entropy[index], mutual_information=raw.mutual_information[index],
                       expected_entropy=raw.expected_entropy[index], num_samples=raw.num_samples)


def choose_alpha(checks: list[dict], target_accuracy: float, min_answered: float) -> dict:
    """The check (one per alpha) with the loosest alpha whose every held-out group keeps ``target_accuracy`` among
    its answered and whose pooled answered share is at least ``min_answered``; when none does, the strictest alpha
    (its shortfall is reported, not hidden)."""
    if not checks:
        raise ValueError("choose_alpha needs at least one transfer check")
    passing = [c for c in checks
               if c["worst_group_answered_acc"] >= target_accuracy and c["answered"] >= min_answered]
    chosen = max(passing, key=lambda c: c["alpha"]) if passing else min(checks, key=lambda c: c["alpha"])
    return {**chosen, "meets_target": bool(passing), "target_accuracy": target_accuracy, "min_answered": min_answered}
