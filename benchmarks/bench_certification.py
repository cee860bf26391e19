"""How much coverage the reject rule's certification design costs: the released design against single fixed sequences.

    python benchmarks/bench_certification.py [NAME ...] [--output benchmarks/results_certification.md]

A diagnostic, not a way to choose: a release's rule is certified by ``train.abstention.certify_reject_entropy`` with
the design fixed in advance (five fixed sequences from strict to loose, Bonferroni: each at delta / 5). Choosing the
design after seeing where it stops on a calibration split would void the guarantee on that split, so nothing here
changes a release. What it measures, per released detector, on the exact calibration half its rule was certified on
(``train.calibration.calibration_halves`` of the run's recorded validation split, predicted as ``train.evaluate``
predicts it): the coverage each design certifies at the release's alpha and delta, and what that rule does on test.
The released design's row must reproduce the release's ``config.abstention`` (checked).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hub_models import BayesFakeDetector  # noqa: E402
from hub_models.hub import HUB_MODELS_DIR  # noqa: E402
from train.abstention import STARTS, certify_reject_entropy, selective_outcome  # noqa: E402
from train.calibration import calibration_halves  # noqa: E402
from train.domain import gate_images  # noqa: E402
from train.evaluate import evaluation_data, native_splits, read_run_record  # noqa: E402
from train.prediction import predict  # noqa: E402

# The designs compared: the released one, and one fixed sequence from each of two starts at the whole level delta.
DESIGNS = {"released: 5 sequences, each at delta / 5": STARTS, "1 sequence from 0.01 nats, at delta": (1e-2,),
           "1 sequence from 0.1 nats, at delta": (1e-1,)}


def predictions(model, name: str, seed: int = 0) -> tuple:
    """The calibration half's and the test split's predictions, made as ``train.evaluate`` makes them."""
    _, record = read_run_record(HUB_MODELS_DIR / name)
    splits = evaluation_data(model, record, "test")
    native = native_splits(model, record)
    domain = {key: gate_images(model, native[key][0]) for key in ("val", "test")}
    _, certify = calibration_halves(splits["val"][1], seed)
    num_samples = model.config.num_samples
    calibration = predict(model, splits["val"][0][certify], splits["val"][1][certify], num_samples, 512, seed,
                          progress=True, domain_inputs=domain["val"][certify])
    test = predict(model, *splits["test"], num_samples, 512, seed, progress=True, domain_inputs=domain["test"])
    return calibration, test


def rows(name: str) -> list[str]:
    model = BayesFakeDetector.from_pretrained(HUB_MODELS_DIR / name).eval()
    config = model.config
    alpha, delta = config.abstention["alpha"], config.abstention["delta"]
    calibration, test = predictions(model, name)
    inside = np.asarray(calibration.in_domain, bool)
    entropy, wrong = calibration.reject_scores(config)[inside], calibration.wrong(config.threshold)[inside]
    out = []
    for design, starts in DESIGNS.items():
        rule = certify_reject_entropy(entropy, wrong, alpha, delta, starts=starts)
        if starts == STARTS:  # the release's own rule must come back exactly
            released = round(rule.coverage, 6), rule.answered_errors
            expected = config.abstention["coverage"], config.abstention["answered_errors"]
            if released != expected:
                raise RuntimeError(f"{name}: the released design gives {released}, the release says {expected}")
        on_test = selective_outcome(test.reject_scores(config), test.wrong(config.threshold), test.in_domain,
                                    rule.reject_entropy)
        if rule.reject_entropy is None:  # nothing certified: every in-domain image goes to review
            out.append(f"| {name} {config.release_version} | {design} | {rule.calibration_n} | nothing certified "
                       f"| | | 0.0% | |")
            continue
        out.append(f"| {name} {config.release_version} | {design} | {rule.calibration_n} | {100 * rule.coverage:.1f}% "
                   f"| {rule.answered_errors} | {rule.p_value:.3g} | {100 * on_test['sc/coverage']:.1f}% | "
                   f"{100 * on_test['sc/answered_acc']:.2f}% |")
    return out


def run_tables(description: str, script: str, output: str, header: str, rows_of, title: str, intro: str,
               argv: list[str] | None = None) -> None:
    """The command line these diagnostics share: release NAMEs (default: the two detectors whose rule they study), a
    table with a row group per name (``rows_of(name)``), written to OUTPUT as Markdown with how it was measured, and
    printed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["cifake-mcdropout-cnn", "cifake-ae-mobilenetv2"])
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / output))
    args = parser.parse_args(argv)
    started = time.time()
    columns = header.count("|") - 1
    table = [header, "|" + "---|" * columns]
    for name in args.names:
        table += rows_of(name)
    command = f"python benchmarks/{script} " + " ".join(argv or sys.argv[1:])
    text = "\n".join([
        f"# {title}",
        "",
        f"Measured {datetime.date.today()} on {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; `{command.strip()}` ({time.time() - started:.0f} s).",
        "",
        intro,
        "",
        *table,
        "",
    ])
    Path(args.output).write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    run_tables(__doc__, "bench_certification.py", "results_certification.md",
               "| detector | design | in-domain calibration images | certified coverage (calibration) | errors among "
               "answered | p-value | test: answered | test: accuracy among answered |", rows,
               "What the certification design costs in coverage (diagnostic, nothing chosen from it)",
               "Each release's rule was certified with the first design (fixed before any data was seen). The others "
               "are what single fixed sequences would have certified on the same calibration images; adopting one now, "
               "after seeing this, would void the guarantee on these images, so no release uses them.", argv)


if __name__ == "__main__":
    main()
