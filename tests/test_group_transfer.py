"""The leave-one-group-out check of calibration (train.group_transfer): tempered predictions are what the detector
outputs, a group whose errors are confident is caught, and the reject rule's level is chosen by what transfers."""

import numpy as np
import pytest
import torch

from train.group_transfer import choose_alpha, tempered, transfer_check
from train.prediction import Predictions, predict

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tempered_predictions_are_what_the_detector_outputs_at_that_temperature():
    from tests.test_fullsize import synthetic_wild, tiny_multiview

    features, data = synthetic_wild(n_per_group=6, dim=1280)
    model = tiny_multiview()
    model.config.calibration_temperature = 1.0
    raw = predict(model, features, data.labels, progress=False, keep_sample_logits=True)
    model.config.calibration_temperature = 2.5
    direct = predict(model, features, data.labels, progress=False)
    again = tempered(raw, 2.5)
    np.testing.assert_allclose(again.p_fake, direct.p_fake, atol=1e-5)
    np.testing.assert_allclose(again.predictive_entropy, direct.predictive_entropy, atol=1e-5)
    assert not np.allclose(tempered(raw, 1.0).p_fake, direct.p_fake, atol=1e-3)  # the temperature does matter
    with pytest.raises(ValueError, match="keep_sample_logits"):
        tempered(direct, 2.0)


def sampled(labels: np.ndarray, margin: np.ndarray, seed: int = 0, samples: int = 30) -> Predictions:
    """Out-of-fold-like predictions with sampled logits: image i leans to its true class by margin[i] (negative:
    confidently wrong), with sampling noise."""
    rng = np.random.default_rng(seed)
    sign = np.where(labels == 1, 1.0, -1.0)
    z = sign * margin + rng.normal(0.0, 0.5, size=(samples, len(labels)))
    logits = np.stack([-z / 2, z / 2], axis=-1).astype(np.float32)
    zero = np.zeros(len(labels))
    return Predictions(labels=labels, p_fake=zero, std_fake=zero, predictive_entropy=zero, mutual_information=zero,
                       expected_entropy=zero, num_samples=samples, sample_logits=logits)


def test_a_group_with_confident_errors_is_caught_by_the_check():
    rng = np.random.default_rng(0)
    groups = np.repeat(["g1", "g2", "g3", "g4", "shifted"], 200)
    labels = rng.integers(0, 2, len(groups))
    margin = rng.uniform(-0.5, 6.0, len(groups))  # mostly right, some unsure, a few mildly wrong
    shifted = groups == "shifted"
    margin[shifted & (rng.random(len(groups)) < 0.3)] = -3.0  # 30% of one group: confidently wrong
    raw = sampled(labels, margin)
    scores = np.zeros(len(groups))  # every image in domain
    check = transfer_check(raw, scores, groups, alpha=0.20, delta=0.10)
    rows = {r["group"]: r for r in check["groups"]}
    assert set(rows) == {"g1", "g2", "g3", "g4", "shifted"} and all(r["n"] == 200 for r in rows.values())
    assert rows["shifted"]["answered_acc"] < 0.8 < min(rows[g]["answered_acc"] for g in ("g1", "g2", "g3", "g4"))
    assert check["worst_group_answered_acc"] == rows["shifted"]["answered_acc"]
    assert rows["shifted"]["ece"] == check["worst_group_ece"] > check["ece"]
    assert 0 < check["answered"] < 1 and 0.5 < check["auroc"] <= 1 and 0.5 < check["error_detection_auroc"] <= 1
    strict = transfer_check(raw, scores, groups, alpha=0.10, delta=0.10)
    assert strict["answered"] < check["answered"]  # a stricter level answers fewer


def test_choose_alpha_takes_the_loosest_level_that_transfers_and_says_when_none_does():
    checks = [{"alpha": 0.10, "worst_group_answered_acc": 0.85, "answered": 0.95},
              {"alpha": 0.05, "worst_group_answered_acc": 0.91, "answered": 0.85},
              {"alpha": 0.03, "worst_group_answered_acc": 0.95, "answered": 0.60}]
    chosen = choose_alpha(checks, target_accuracy=0.90, min_answered=0.80)
    assert chosen["alpha"] == 0.05 and chosen["meets_target"]
    none = choose_alpha(checks, target_accuracy=0.99, min_answered=0.80)
    assert none["alpha"] == 0.03 and not none["meets_target"]
    with pytest.raises(ValueError):
        choose_alpha([], 0.9, 0.8)


def test_grouped_calibration_certifies_at_the_level_the_transfer_check_chose():
    from tests.test_fullsize import synthetic_wild, tiny_multiview
    from train.domain import attach_domain_gate, fit_domain_gate
    from train.fullsize import calibrate_grouped, fold_heads, fold_names, group_folds, train_head

    features, data = synthetic_wild(n_per_group=30)
    folds = group_folds(data, ["A"], seed=0)
    names = fold_names(data, folds)
    assert set(names) == {"B", "g1", "g2", "g3"} and set(names[data.group == "B"]) == {"B"}
    assert len(set(names[data.group == "A"])) == 4  # A's images named after the folds they were dealt to
    model = tiny_multiview()
    cfg = {"epochs": 20, "lr": 1e-2, "weight_decay": 1e-3, "seed": 0, "alpha": 0.4, "delta": 0.1,
           "alpha_choices": [0.45, 0.3], "transfer_target_accuracy": 0.0, "transfer_min_answered": 0.0}
    heads = fold_heads(model, features, data.labels, folds, [8], cfg)
    train_head(model, features, data.labels, cfg["epochs"], cfg["lr"], cfg["weight_decay"], cfg["seed"])
    attach_domain_gate(model, "features")
    fit_domain_gate(model, features, data.labels, progress=False)
    fitted = calibrate_grouped(model, features, data, folds, heads, cfg)
    assert [c["alpha"] for c in fitted["transfer_checks"]] == [0.45, 0.3]
    assert fitted["transfer"]["alpha"] == 0.45 and fitted["transfer"]["meets_target"]  # any level passes a 0 target
    assert fitted["abstention"]["alpha"] == 0.45 and model.config.abstention["alpha"] == 0.45
    assert {r["group"] for r in fitted["transfer"]["groups"]} == {"B", "g1", "g2", "g3"}
    cfg.update(transfer_target_accuracy=1.01)  # no level can pass: the strictest is taken, and it says so
    fitted = calibrate_grouped(model, features, data, folds, heads, cfg)
    assert fitted["transfer"]["alpha"] == 0.3 and not fitted["transfer"]["meets_target"]
