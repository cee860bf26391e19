"""The reject rule with a guarantee: Learn then Test on a calibration split, with an exact binomial tail bound.

A detector answers an image when the gate says it is in domain and its predictive entropy is at most
``reject_entropy`` (lambda); otherwise it says "uncertain: needs human review". We choose lambda so that

    P( error rate among answered in-domain images <= alpha ) >= 1 - delta

over the draw of the calibration split (Angelopoulos, Bates, Candes, Jordan & Lei, "Learn then Test", 2021).

For each candidate lambda the null hypothesis "the selective risk R(lambda) = P(wrong | answered) exceeds alpha" is
tested with the exact binomial tail: given the n calibration images it answers, its k errors are Binomial(n, R), so
p(lambda) = P(Binomial(n, alpha) <= k) is a valid p-value. Candidates come from a grid fixed in advance (not from the
data), tested in a fixed sequence from strict to loose, stopping at the first that fails; every rejected null is
then safe with family-wise error at most delta. The strictest candidates answer too few images to reject anything
(with no error at all, n >= 230 images are needed at alpha = 0.01, delta = 0.1), and a fixed sequence stops at its
first failure, so we run a few sequences from starting points fixed in advance, each at level delta / (number of
starts) (Bonferroni over the sequences), and keep the loosest lambda any of them certifies.

Why not MAPIE's ``BinaryClassificationController``: it certifies a threshold on P(FAKE) for a two-way decision
(precision, recall, ...); our rule is a three-way one (answer or abstain, on the entropy), whose risk is conditional
on answering. The procedure is a few lines of scipy, and the tests check its guarantee by simulation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binom

ALPHA = 0.01
DELTA = 0.1
# Candidate reject entropies (nats), fixed in advance: a geometric grid over the range of a binary predictive
# entropy (0, ln 2]; and the starts of the fixed sequences, one per decade (the grid points nearest to them).
GRID = np.geomspace(1e-6, np.log(2.0), 240)
STARTS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
METHOD = "Learn then Test: exact binomial tail p-values, fixed-sequence from strict to loose over a grid fixed in " \
         "advance, Bonferroni over 5 starting points"


@dataclass
class RejectRule:
    """The certified reject rule and what it reached on the calibration split."""

    reject_entropy: float | None  # None: no lambda could be certified; the detector must abstain on everything
    alpha: float
    delta: float
    method: str
    calibration_n: int  # in-domain calibration images
    coverage: float  # share of them answered under the rule
    answered_errors: int
    p_value: float | None

    def as_config(self) -> dict:
        """The record stored in ``config.abstention``."""
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()
                if k != "reject_entropy"}


def binomial_p_value(errors: int, answered: int, alpha: float) -> float:
    """p-value of "selective risk > alpha" after ``errors`` among ``answered``: P(Binomial(answered, alpha) <= errors)."""
    if answered == 0:
        return 1.0
    return float(binom.cdf(errors, answered, alpha))


def certify_reject_entropy(entropy, wrong, alpha: float = ALPHA, delta: float = DELTA,
                           grid: np.ndarray = GRID, starts=STARTS) -> RejectRule:
    """The loosest reject entropy whose selective risk is certified <= ``alpha`` at level ``delta``.

    ``entropy`` [N] and ``wrong`` [N] (bool: the verdict at the detector's threshold is wrong) are the in-domain
    calibration images. Returns a ``RejectRule``; its ``reject_entropy`` is None when no candidate is certified.
    """
    entropy = np.asarray(entropy, dtype=np.float64)
    wrong = np.asarray(wrong, dtype=bool)
    if entropy.shape != wrong.shape or entropy.ndim != 1:
        raise ValueError(f"entropy and wrong must be 1-D arrays of one length; got {entropy.shape}, {wrong.shape}")
    if not np.isfinite(entropy).all():
        raise ValueError("entropy holds NaN or infinite values: no rule can be certified on them")
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise ValueError(f"alpha and delta must be in (0, 1); got {alpha}, {delta}")
    grid = np.sort(np.asarray(grid, dtype=np.float64))
    start_indices = sorted({int(np.argmin(np.abs(np.log(grid) - np.log(s)))) for s in starts})
    level = delta / len(start_indices)
    order = np.argsort(entropy)
    sorted_entropy, cumulative_errors = entropy[order], np.cumsum(wrong[order])

    def answered_and_errors(lam: float) -> tuple[int, int]:
        n = int(np.searchsorted(sorted_entropy, lam, side="right"))
        return n, int(cumulative_errors[n - 1]) if n else 0

    best = None  # (lambda, n, k, p)
    for start in start_indices:
        for lam in grid[start:]:
            n, k = answered_and_errors(lam)
            p = binomial_p_value(k, n, alpha)
            if p > level:
                break
            if best is None or lam > best[0]:
                best = (float(lam), n, k, p)
    total = len(entropy)
    if best is None:
        return RejectRule(None, alpha, delta, METHOD, total, 0.0, 0, None)
    lam, n, k, p = best
    return RejectRule(lam, alpha, delta, METHOD, total, n / total if total else 0.0, k, p)


def selective_outcome(entropy, wrong, in_domain, reject_entropy: float | None) -> dict:
    """What the rule does on a set of images: coverage (share answered, out of all), the share outside the domain,
    the share sent to review, and the error rate among the answered (NaN when none is answered)."""
    entropy = np.asarray(entropy, dtype=np.float64)
    wrong = np.asarray(wrong, dtype=bool)
    inside = np.ones_like(wrong) if in_domain is None else np.asarray(in_domain, dtype=bool)
    confident = np.zeros_like(wrong) if reject_entropy is None else entropy <= reject_entropy
    answered = inside & confident
    n = len(wrong)
    return {
        "sc/coverage": float(answered.mean()) if n else float("nan"),
        "sc/answered_risk": float(wrong[answered].mean()) if answered.any() else float("nan"),
        "sc/answered_acc": float(1 - wrong[answered].mean()) if answered.any() else float("nan"),
        "sc/answered_n": int(answered.sum()),
        "ood/outside_share": float((~inside).mean()) if n else float("nan"),
        "sc/review_share": float((inside & ~confident).mean()) if n else float("nan"),
    }
