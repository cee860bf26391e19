"""The certified reject rule (train.abstention): its guarantee holds by simulation, and it behaves at the edges."""

import numpy as np
import pytest

from train.abstention import ALPHA, certify_reject_entropy, binomial_p_value, selective_outcome


def draw(n, rng):
    """A detector whose error probability rises with its entropy: P(wrong | H) = 0.7 * H / ln 2 (a known law, so the
    true selective risk of any lambda is computable)."""
    entropy = rng.beta(0.4, 3.0, n) * np.log(2)
    wrong = rng.random(n) < 0.7 * entropy / np.log(2)
    return entropy, wrong


def true_selective_risk(lam, rng):
    entropy, _ = draw(400_000, rng)
    answered = entropy <= lam
    return float((0.7 * entropy[answered] / np.log(2)).mean())


def test_guarantee_holds_by_simulation():
    """Over many calibration draws, the certified lambda's true risk exceeds alpha at most delta of the time."""
    rng = np.random.default_rng(0)
    reference = np.random.default_rng(1)
    failures, certified = 0, 0
    risk_cache = {}
    for _ in range(200):
        rule = certify_reject_entropy(*draw(2000, rng), alpha=0.02, delta=0.1)
        if rule.reject_entropy is None:
            continue
        certified += 1
        key = round(rule.reject_entropy, 12)
        if key not in risk_cache:
            risk_cache[key] = true_selective_risk(rule.reject_entropy, reference)
        failures += risk_cache[key] > 0.02
    assert certified > 150  # the procedure has power here
    assert failures / certified <= 0.1


def test_rule_is_certified_and_reports_coverage():
    rng = np.random.default_rng(3)
    entropy, wrong = draw(5000, rng)
    rule = certify_reject_entropy(entropy, wrong, alpha=0.02, delta=0.1)
    assert rule.reject_entropy is not None
    answered = entropy <= rule.reject_entropy
    assert rule.coverage == pytest.approx(answered.mean())
    assert rule.answered_errors == wrong[answered].sum()
    assert rule.p_value <= 0.1 / 5
    assert set(rule.as_config()) == {"alpha", "delta", "method", "calibration_n", "coverage", "answered_errors",
                                      "p_value"}


def test_a_detector_too_weak_is_never_certified():
    rng = np.random.default_rng(4)
    entropy = rng.random(3000) * np.log(2)
    wrong = rng.random(3000) < 0.2  # 20% wrong whatever its entropy
    rule = certify_reject_entropy(entropy, wrong)
    assert rule.reject_entropy is None and rule.coverage == 0.0


def test_perfect_detector_answers_everything_on_the_grid():
    entropy = np.linspace(1e-4, 0.5, 4000)
    rule = certify_reject_entropy(entropy, np.zeros(4000, bool))
    assert rule.coverage == 1.0 and rule.answered_errors == 0


def test_p_value_is_the_binomial_tail():
    assert binomial_p_value(0, 230, ALPHA) == pytest.approx(0.99 ** 230)
    assert binomial_p_value(0, 0, ALPHA) == 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        certify_reject_entropy(np.array([0.1, np.nan]), np.array([False, True]))
    with pytest.raises(ValueError, match="1-D"):
        certify_reject_entropy(np.zeros(3), np.zeros(4, bool))
    with pytest.raises(ValueError, match="alpha"):
        certify_reject_entropy(np.zeros(3), np.zeros(3, bool), alpha=0)


def test_selective_outcome_counts_outside_review_and_answered():
    entropy = np.array([0.01, 0.5, 0.01, 0.01])
    wrong = np.array([False, True, True, False])
    inside = np.array([True, True, True, False])
    out = selective_outcome(entropy, wrong, inside, reject_entropy=0.1)
    assert out["ood/outside_share"] == 0.25 and out["sc/review_share"] == 0.25
    assert out["sc/coverage"] == 0.5 and out["sc/answered_risk"] == 0.5 and out["sc/answered_n"] == 2
    none = selective_outcome(entropy, wrong, inside, reject_entropy=None)
    assert none["sc/coverage"] == 0.0 and np.isnan(none["sc/answered_acc"])
