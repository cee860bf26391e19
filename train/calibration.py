"""Post-hoc calibration of a BayesFake detector on validation data: temperature, decision threshold, reject rule.

Everything here is fitted on the VALIDATION split only (never test). The fitting functions return plain numbers;
``calibrate_on_validation`` runs them all on a model and stores the results in its config
(``calibration_temperature``, ``threshold``, ``reject_entropy``). Inputs are arrays or any object with the ``labels`` /
``p_fake`` / ``predictive_entropy`` arrays of ``train.prediction.Predictions``.

The temperature minimises the NLL of the tempered Monte Carlo predictive computed in log space from the raw sampled
logits (``temperature_nll``): that is the fitting objective. The NLL reported before and after it is
``train.metrics.nll``, the project's one NLL.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn.metrics import precision_recall_curve, roc_curve

from hub_models.configuration_bayesfake import REJECT_SCORE_WORDS
from train.abstention import ALPHA, DELTA, certify_reject_entropy
from train.metrics import calibration_metrics
from train.prediction import Predictions, predict

# Search range of the temperature: wide enough for any sane network (x20 over- or under-confidence).
TEMPERATURE_BOUNDS = (0.01, 1000.0)  # wide: a Gaussian NB sums log-likelihood ratios over ~1000 features
# config.threshold must lie strictly inside (0, 1); curve thresholds can sit on 0, 1 or inf.
THRESHOLD_EPS = 1e-6
THRESHOLD_RULES = ("0.5", "f1_optimal", "youden_j")

log = logging.getLogger(__name__)


def mc_log_predictive(sample_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log of the Monte Carlo mean predictive, log mean_t softmax(z_t / temperature), [N, C] from [T, N, C].

    This is what the detector outputs (it tempers every sampled logit, then averages); computed in log space so that
    confidently wrong samples keep their full, finite penalty.
    """
    log_probs = torch.log_softmax(sample_logits / temperature, dim=-1)
    return torch.logsumexp(log_probs, dim=0) - math.log(sample_logits.shape[0])


def temperature_nll(sample_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under the tempered Monte Carlo predictive."""
    log_pred = mc_log_predictive(sample_logits, temperature)
    return float(-log_pred.gather(1, labels.view(-1, 1)).mean())


def fit_temperature(sample_logits, labels) -> float:
    """The single temperature T > 0 minimising validation NLL of mean_t softmax(z_t / T).

    Fitted on the raw sampled logits [T, N, 2] (``Predictions.sample_logits``), not on the averaged output: the
    detector applies the temperature to each sample before averaging, and the average of tempered softmaxes is not a
    tempered softmax of any mean logit, so only this objective is the NLL of what the deployed model will output.
    A 1-D bounded Brent search on log T (scale-free, and T stays positive) is exact enough and needs no gradients.
    """
    logits = torch.as_tensor(np.asarray(sample_logits), dtype=torch.float64)
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if logits.dim() != 3 or logits.shape[1] != targets.shape[0]:
        raise ValueError(f"need sample logits [T, N, C] and labels [N]; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: temperature_nll(logits, targets, math.exp(log_t)),
                             bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    temperature = float(math.exp(result.x))
    if not TEMPERATURE_BOUNDS[0] * 1.01 < temperature < TEMPERATURE_BOUNDS[1] / 1.01:
        # At a bound the optimum lies outside: the logits carry (almost) no signal, or are wildly miscalibrated.
        log.warning("fitted temperature %.4g sits at the search bound %s", temperature, TEMPERATURE_BOUNDS)
    return temperature


def _clip_threshold(threshold: float) -> float:
    return float(np.clip(threshold, THRESHOLD_EPS, 1.0 - THRESHOLD_EPS))


def f1_optimal_threshold(labels: np.ndarray, p_fake: np.ndarray) -> float:
    """Threshold on P(FAKE) (rule: FAKE when p >= threshold) maximising F1 of the FAKE class."""
    precision, recall, thresholds = precision_recall_curve(labels, p_fake)
    # The curve's last point (precision 1, recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=(precision + recall) > 0)
    return _clip_threshold(thresholds[np.argmax(f1)])


def youden_threshold(labels: np.ndarray, p_fake: np.ndarray) -> float:
    """Threshold on P(FAKE) maximising Youden's J = TPR - FPR (balanced sensitivity and specificity)."""
    fpr, tpr, thresholds = roc_curve(labels, p_fake)
    # roc_curve's first threshold is +inf (nothing flagged): J = 0 there, never the best unless nothing separates.
    return _clip_threshold(thresholds[np.argmax(tpr - fpr)])


def choose_thresholds(val_preds: Predictions, rule: str = "f1_optimal") -> dict[str, float]:
    """Candidate thresholds on P(FAKE) chosen on validation, and the ``chosen`` one (``rule``, F1-optimal by default).

    Returns {"0.5", "f1_optimal", "youden_j", "chosen"}; store ``chosen`` in ``config.threshold``.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"rule must be one of {THRESHOLD_RULES}; got {rule!r}")
    labels, p_fake = np.asarray(val_preds.labels), np.asarray(val_preds.p_fake)
    if len(np.unique(labels)) < 2:
        raise ValueError("choosing a threshold needs validation images of both classes")
    thresholds = {
        "0.5": 0.5,
        "f1_optimal": f1_optimal_threshold(labels, p_fake),
        "youden_j": youden_threshold(labels, p_fake),
    }
    thresholds["chosen"] = thresholds[rule]
    return thresholds


def choose_reject_entropy(val_preds: Predictions, *, reject_rate: float = 0.10) -> float:
    """Predictive entropy (nats) above which ~``reject_rate`` of validation images go to human review.

    The detector's rule is "uncertain when entropy > reject_entropy", so this is the (1 - reject_rate) quantile. It does
    not depend on the decision threshold. Kept > 0 (the config requires it) even when most entropies are exactly 0.
    """
    if not 0.0 < reject_rate < 1.0:
        raise ValueError(f"reject_rate must be in (0, 1); got {reject_rate}")
    quantile = float(np.quantile(np.asarray(val_preds.predictive_entropy, dtype=np.float64), 1.0 - reject_rate))
    return max(quantile, 1e-9)


def calibrate_on_validation(model, inputs, labels, num_samples: int | None = None, batch_size: int = 512,
                            seed: int = 0, reject_rate: float = 0.10, threshold_rule: str | None = None,
                            progress: bool = True, domain_inputs=None) -> dict:
    """Fit temperature, threshold and reject entropy on validation (uint8 images or cached features, as ``predict``
    takes them) and store them in ``model.config``. The threshold follows ``threshold_rule``, by default the
    detector's own ``config.threshold_rule`` (F1-optimal unless the config says e.g. "youden_j").

    Returns a summary: the fitted values, every candidate threshold, and validation NLL / ECE before and after.
    """
    threshold_rule = threshold_rule or model.config.threshold_rule
    raw = predict(model, inputs, labels, num_samples, batch_size, seed, progress, keep_sample_logits=True,
                  domain_inputs=domain_inputs)
    before = calibration_metrics(raw)
    temperature_before = model.config.calibration_temperature
    model.config.calibration_temperature = fit_temperature(raw.sample_logits, raw.labels)
    # Re-predict through the model itself: what is measured is what the tempered detector outputs.
    calibrated = predict(model, inputs, labels, num_samples, batch_size, seed, progress, domain_inputs=domain_inputs)
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



def calibration_halves(labels, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two stratified, seeded halves of validation: the first fits temperature, threshold and domain gate
    threshold; the second, untouched by them, certifies the reject rule (its guarantee needs fresh data)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    fit, certify = train_test_split(np.arange(len(labels)), test_size=0.5, random_state=seed, stratify=labels)
    return np.sort(fit), np.sort(certify)


def certify_reject_rule(model, inputs, labels, alpha: float = ALPHA, delta: float = DELTA,
                        num_samples: int | None = None, batch_size: int = 512, seed: int = 0,
                        progress: bool = True, domain_inputs=None) -> dict:
    """Choose ``config.reject_entropy`` on calibration data so that, with probability >= 1 - ``delta``, at most
    ``alpha`` of the in-domain images the detector answers are wrong (``train.abstention``); record how in
    ``config.abstention`` and return that record. Run it after every other fitted value (temperature, threshold,
    domain gate): the rule is certified for the detector as it is then."""
    preds = predict(model, inputs, labels, num_samples, batch_size, seed, progress, domain_inputs=domain_inputs)
    return certify_reject_rule_on(model, preds, alpha, delta)


def certify_reject_rule_on(model, preds: Predictions, alpha: float = ALPHA, delta: float = DELTA) -> dict:
    """``certify_reject_rule`` on predictions already made (e.g. out-of-fold predictions of models that held out each
    calibration image's group), with the detector's threshold; sets and returns ``config.abstention``."""
    inside = np.ones(len(preds), bool) if preds.in_domain is None else np.asarray(preds.in_domain, bool)
    rule = certify_reject_entropy(preds.reject_scores(model.config)[inside],
                                  preds.wrong(model.config.threshold)[inside], alpha, delta)
    model.config.reject_entropy = rule.reject_entropy
    score = REJECT_SCORE_WORDS[model.config.reject_score]
    model.config.abstention = {
        **rule.as_config(),
        "certified": rule.reject_entropy is not None,
        "rule": f"answer when the image is in domain and its {score} <= reject_entropy; otherwise "
                "'uncertain: needs human review' (every in-domain image when nothing could be certified)",
        "calibration_out_of_domain": int((~inside).sum()),
    }
    return model.config.abstention
