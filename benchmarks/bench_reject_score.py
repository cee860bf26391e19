"""Which score the reject rule should read, measured where the choice may be made: the validation half that fits
temperature and threshold, never the half that certifies the rule.

    python benchmarks/bench_reject_score.py [NAME ...] [--output benchmarks/results_reject_score.md]

For each released detector: its predictions on the fitting half of the run's recorded validation split (as
``train.evaluate`` makes them, T = the config's, seed 0), then for each reject score of ``config.reject_score``
(``predictive_entropy``, ``verdict_entropy``) the error-detection AUROC (the score ranking the wrong answers at the
detector's threshold) and the share the release's own Learn-then-Test procedure (``train.abstention``, alpha and delta
of the release) would certify on these images. Every fitting-half image counts (the domain gate, which lets about 99%
of them through, is not applied here). This is how CNN 3.1.0 and autoencoder 2.2.0 chose ``verdict_entropy`` before
their certifying half was read; the certified and test figures of the releases are in their cards.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hub_models import BayesFakeDetector  # noqa: E402
from hub_models.configuration_bayesfake import REJECT_SCORES  # noqa: E402
from hub_models.hub import HUB_MODELS_DIR  # noqa: E402
from train.abstention import certify_reject_entropy  # noqa: E402
from train.calibration import calibration_halves  # noqa: E402
from train.domain import gate_images  # noqa: E402
from train.evaluate import evaluation_data, native_splits, read_run_record  # noqa: E402
from train.metrics import auroc  # noqa: E402
from train.prediction import predict  # noqa: E402

from bench_certification import run_tables  # noqa: E402  (a sibling script: run as python benchmarks/...)


def rows(name: str, seed: int = 0) -> list[str]:
    model = BayesFakeDetector.from_pretrained(HUB_MODELS_DIR / name).eval()
    config = model.config
    _, record = read_run_record(HUB_MODELS_DIR / name)
    splits = evaluation_data(model, record, "test")
    val_images, val_labels = splits["val"][:2]
    fit, _ = calibration_halves(val_labels, seed)
    domain = gate_images(model, native_splits(model, record)["val"][0])
    preds = predict(model, val_images[fit], val_labels[fit], config.num_samples, 512, seed, progress=True,
                    domain_inputs=domain[fit])
    wrong = preds.wrong(config.threshold)
    out = []
    for score in REJECT_SCORES:
        config.reject_score = score
        values = preds.reject_scores(config)
        rule = certify_reject_entropy(values, wrong, config.abstention["alpha"], config.abstention["delta"])
        out.append(f"| {name} {config.release_version} | {score} | {len(wrong)} | {100 * (1 - wrong.mean()):.2f}% | "
                   f"{auroc(wrong, values):.3f} | {100 * rule.coverage:.1f}% | {rule.answered_errors} |")
    return out


def main(argv: list[str] | None = None) -> None:
    run_tables(__doc__, "bench_reject_score.py", "results_reject_score.md",
               "| detector | reject score | fitting-half images | accuracy | error-detection AUROC | certified share "
               "(same procedure, these images) | errors among answered |", rows,
               "Which score the reject rule reads (measured on the validation half that fits, not the one that "
               "certifies)",
               "The predictive entropy measures how far P(FAKE) is from 0.5; the verdict entropy how far it is from the "
               "detector's threshold, where its verdict flips. Both detectors here have thresholds far from 0.5.", argv)


if __name__ == "__main__":
    main()
