"""Calibrate a trained detector on validation, then measure it on a held-out split and write the report.

    python -m train.evaluate MODEL_DIR [--split test] [--out DIR] [--export OUT_DIR] [--num-samples T]
        [--max-eval N] [--data SOURCE] [--seed 0] [--command "..."]

MODEL_DIR is a trained detector folder (training's ``OUT/final``, or a released Hub folder). The validation split is
the run's own: ``MODEL_DIR/train_history.json`` (or the run folder's ``history.json``) records its source, fraction,
seed and a sha256 of its indices; evaluation re-derives the split from them and refuses when the hash differs. Images
are decoded with the detector's own processor; a head trained on a frozen backbone's features is evaluated on the same
feature cache (the released folder gives the same outputs from pixels, tested).

On validation it fits the temperature, the decision threshold on P(FAKE) and the reject entropy, and stores them in
the model's config (``train.calibration``). On the requested split it measures classification, calibration and
uncertainty metrics (``train.metrics``: ``cls/``, ``cal/``, ``sc/``), and writes ``report.json``, ``report.md`` and
PNG plots (``train.report``, ``train.plots``). ``--export`` then writes the calibrated model as a complete Hub repo
folder with the report and plots in its card, and the run's record as its ``train_history.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from train.abstention import ALPHA, DELTA
from train.calibration import calibrate_on_validation, calibration_halves, certify_reject_rule
from train.domain import (GATE_TRAIN_IMAGES, attach_domain_gate, choose_domain_threshold, fit_domain_gate,
                          gate_images)
from train.offdomain import WILD, stress_sets, stress_report
from train.data import check_split_record, decode_processor, load_splits, seeded_subset
from train.features import preprocess_uint8, split_features
from train.metrics import compute_metrics
from train.prediction import is_features, predict
from train.report import write_report

log = logging.getLogger(__name__)


def calibrate_and_evaluate(model, splits: dict, out_dir: str | Path, num_samples: int | None = None,
                           split: str = "test", name: str = "bayesfake", dataset: str = "CIFAKE",
                           batch_size: int = 512, seed: int = 0, reject_rate: float = 0.10,
                           threshold_rule: str | None = None, progress: bool = True, alpha: float | None = None,
                           delta: float = DELTA, gate_train: tuple | None = None, stress: dict | None = None,
                           frozen_features: bool = False) -> dict:
    """Calibrate ``model`` on ``splits["val"]`` (its config is updated), evaluate it on ``splits[split]`` and write the
    report into ``out_dir``; return the report dict. ``splits`` maps split names to (uint8 images or a frozen backbone's
    cached features, int64 labels[, uint8 images at the domain gate's input size when its gate has its own
    extractor]); on features the report also draws their PCA.

    With ``alpha`` the reject rule is certified (``train.abstention``): validation is cut in two stratified halves, the
    first fits temperature, threshold and (with ``gate_train``, the training (inputs, labels) of an attached domain
    gate) the gate's Gaussians and threshold; the second certifies ``reject_entropy``. Without it, the reject entropy
    is the validation quantile that sends ``reject_rate`` to review (releases before 2.0.0). ``stress`` (sets from
    ``train.offdomain.stress_sets``) adds the laundered and off-domain report, against the test split's predictions.
    ``frozen_features``: a head on a frozen backbone, whose features of new image sets are cached and shared."""
    num_samples = num_samples or model.config.num_samples
    val_inputs, val_labels, val_domain = (*splits["val"], None)[:3]

    def rows(array, index):
        return None if array is None else array[index]

    if alpha is None:
        summary = calibrate_on_validation(model, val_inputs, val_labels, num_samples, batch_size, seed, reject_rate,
                                          threshold_rule, progress, domain_inputs=val_domain)
    else:
        fit, certify = calibration_halves(val_labels, seed)
        gate = None
        if gate_train is not None:  # first: every forward pass of a gated detector reports in_domain
            gate = fit_domain_gate(model, *gate_train, seed=seed, progress=progress, cache=frozen_features)
            gate_val = val_inputs if val_domain is None else val_domain
            gate["threshold"] = choose_domain_threshold(model, gate_val[fit], progress=progress)
        summary = calibrate_on_validation(model, val_inputs[fit], val_labels[fit], num_samples, batch_size, seed,
                                          reject_rate, threshold_rule, progress, domain_inputs=rows(val_domain, fit))
        if gate is not None:
            summary["domain_gate"] = gate
        summary["abstention"] = certify_reject_rule(model, val_inputs[certify], val_labels[certify], alpha, delta,
                                                    num_samples, batch_size, seed, progress,
                                                    domain_inputs=rows(val_domain, certify))
        summary["calibration"]["reject_entropy"] = model.config.reject_entropy
    test_inputs, test_labels, test_domain = (*splits[split], None)[:3]
    preds = predict(model, test_inputs, test_labels, num_samples, batch_size, seed, progress,
                    domain_inputs=test_domain)
    metrics = compute_metrics(preds, model.config.threshold)
    if alpha is not None:
        metrics.update(preds.answered_outcome(model))
    extra = {"dataset": dataset, "split": split, **summary}
    if stress is not None:
        extra["stress"] = stress_report(model, stress, preds, num_samples, seed, progress=progress,
                                        frozen_features=frozen_features)
    inputs = splits[split][0]
    return write_report(metrics, preds, out_dir, name, extra, features=inputs if is_features(inputs) else None)


def read_run_record(model_dir: str | Path) -> tuple[Path, dict] | tuple[None, None]:
    """The training record of a detector folder: its ``train_history.json``, else the run folder's ``history.json``
    (training writes both); (None, None) when there is none."""
    model_dir = Path(model_dir)
    for path in (model_dir / "train_history.json", model_dir.parent / "history.json"):
        if path.is_file():
            return path, json.loads(path.read_text())
    return None, None


def recorded_splits(record: dict | None, processor, data: str | None = None, val_fraction: float | None = None,
                    split_seed: int | None = None):
    """The run's splits (``train.data.load_splits``) decoded by ``processor``, with the validation split the run
    recorded.

    The source, fraction and seed come from the run's ``record`` (``data`` may point elsewhere, e.g. a moved copy):
    the split is re-derived and must hash to what the run recorded. A record without that hash (from an older
    version) gives its config's fraction and seed, unchecked; with no record at all ``val_fraction`` and
    ``split_seed`` must be given.
    """
    record = record or {}
    recorded = record.get("split")
    train_config = record.get("train_config") or record.get("config") or {}
    if recorded:
        given = {"val_fraction": val_fraction, "seed": split_seed}
        for key, value in given.items():
            if value is not None and value != recorded[key]:
                raise ValueError(f"the run recorded its validation split with {key}={recorded[key]}; got {value}")
        source, val_fraction, split_seed = data or recorded["data"], recorded["val_fraction"], recorded["seed"]
    elif val_fraction is not None and split_seed is not None:
        source = data or train_config.get("data", "../shared/data/cifake")
    elif "val_fraction" in train_config and "seed" in train_config:
        log.warning("the run's record holds no validation-split hash (an older version wrote it): re-deriving the "
                    "split from its config unchecked")
        source = data or train_config.get("data", "../shared/data/cifake")
        val_fraction, split_seed = train_config["val_fraction"], train_config["seed"]
    else:
        raise ValueError("no training record with the validation split (train_history.json in the model folder or "
                         "history.json beside it): pass --val-fraction and --split-seed")
    splits = load_splits(source, processor, val_fraction, split_seed)
    if recorded:
        check_split_record(recorded, splits.record)
    return splits


def evaluation_data(model, record: dict | None, split: str = "test", data: str | None = None,
                    val_fraction: float | None = None, split_seed: int | None = None,
                    progress: bool = True) -> dict[str, tuple]:
    """{"val", ``split``} -> (inputs, labels) to calibrate and evaluate ``model`` on: the run's own validation split
    (``recorded_splits``). A feature run gets its cached backbone features (decoded at its ``decode_size``)."""
    record = record or {}
    train_config = record.get("train_config") or record.get("config") or {}
    # A frozen-backbone head: its training config says so; a record of the older frozen-head trainer (no
    # "train_config", its config under "config") says it by naming the frozen backbone.
    frozen = train_config.get("features") if "train_config" in record else record.get("backbone")
    features = bool(frozen) and not getattr(model, "backbone_stochastic", False)
    processor = decode_processor(model.config, train_config.get("decode_size", 0) if features else 0)
    splits = recorded_splits(record, processor, data, val_fraction, split_seed)
    wanted = {"val": splits["val"], split: splits[split]}
    if features:
        wanted = split_features(model, wanted, splits.record, processor, progress=progress)
    return wanted


def native_splits(model, record: dict | None, data: str | None = None, val_fraction: float | None = None,
                  split_seed: int | None = None) -> dict:
    """The run's train / val / test images decoded at the training images' own side (CIFAKE: 32 px, whatever the
    detector's input size): what the domain gate is fitted on and what laundering is applied to."""
    processor = decode_processor(model.config, model.config.training_image_size)
    return recorded_splits(record, processor, data, val_fraction, split_seed)


def subsample(inputs: np.ndarray, labels: np.ndarray, max_n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of at most ``max_n`` inputs (all of them when ``max_n`` is None)."""
    keep = seeded_subset(len(labels), max_n, seed)
    return (inputs, labels) if keep is None else (inputs[keep], labels[keep])


def main(argv: list[str] | None = None, prog: str = "python -m train.evaluate") -> dict:
    """The command line; returns the report. ``prog`` is how it was called (usage, and the card's default command)."""
    argv = sys.argv[1:] if argv is None else argv
    from hub_models.configuration_bayesfake import RECONSTRUCTION_METRICS, REJECT_SCORES

    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="trained detector folder (training's OUT/final, or a Hub repo folder)")
    parser.add_argument("--split", default="test", help="split to evaluate on (calibration always uses val)")
    parser.add_argument("--num-samples", type=int, help="Monte Carlo samples T (default: the config's)")
    parser.add_argument("--out", help="report folder (default: eval_SPLIT next to MODEL_DIR)")
    parser.add_argument("--export", help="write the calibrated model as a Hub repo folder here")
    parser.add_argument("--name", help="report / model name (default: the export or model folder name)")
    parser.add_argument("--dataset-name", default="CIFAKE", help="dataset name shown in the report and card")
    parser.add_argument("--command", help="command recorded in the model card (default: this command)")
    parser.add_argument("--max-eval", type=int, help="evaluate on a seeded random subset of this many images "
                                                    "per split (quick smoke runs)")
    parser.add_argument("--seed", type=int, default=0, help="Monte Carlo sampling seed and --max-eval subset seed")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--reject-rate", type=float, default=0.10, help="share of validation sent to human review")
    parser.add_argument("--version", help="release version of the export (a changed detector needs a new one)")
    parser.add_argument("--notes", help="what changed in this release, for the card (with --version)")
    parser.add_argument("--alpha", type=float, help=f"certify the reject rule (train.abstention): at most ALPHA of the "
                        f"answered in-domain images wrong (a release uses {ALPHA}); without it, --reject-rate applies")
    parser.add_argument("--delta", type=float, default=DELTA, help="...with probability at least 1 - DELTA")
    parser.add_argument("--domain-gate", help="attach and fit a domain gate: 'features' (the detector's own backbone "
                                              "features) or a timm model name (a frozen extractor, with --domain-weights)")
    parser.add_argument("--domain-weights", help="pretrained weights file of the gate's extractor")
    parser.add_argument("--gate-images", type=int, default=GATE_TRAIN_IMAGES,
                        help="training images the gate's Gaussians are fitted on (a seeded subset)")
    parser.add_argument("--training-data", action="append", help="name of a data set the detector learned from "
                                                                 "(repeat for several); stored in config.training_data")
    parser.add_argument("--reconstruction-metric", choices=RECONSTRUCTION_METRICS,
                        help="an autoencoder detector: what its reconstruction_error measures, set in the "
                             "exported release's config.reconstruction_metric (with --export; chosen after training, "
                             "on wild train vs CIFAKE validation: benchmarks/bench_ae_error_definitions.py)")
    parser.add_argument("--reject-score", choices=REJECT_SCORES,
                        help="what the reject rule compares with reject_entropy (config.reject_score; default: the "
                             "detector's own): verdict_entropy measures how near P(FAKE) is to the threshold")
    parser.add_argument("--stress", action="store_true", help="also report laundered copies of the test split and "
                                                              "the off-domain set --wild (train.offdomain)")
    parser.add_argument("--wild", default=WILD, help="off-domain image set of --stress")
    parser.add_argument("--int8-calibration", type=int, metavar="N",
                        help="run the from-scratch CNN backbone in int8 (config.int8_backbone), its activation ranges "
                             "calibrated on N seeded training images; everything after (temperature, threshold, "
                             "reject rule, test, export, goldens) is then measured in int8")
    parser.add_argument("--data", help="dataset folder or id (default: the one the run recorded)")
    parser.add_argument("--val-fraction", type=float, help="only for a folder without a training record")
    parser.add_argument("--split-seed", type=int, help="only for a folder without a training record")
    args = parser.parse_args(argv)

    from hub_models import BayesFakeDetector, BayesFakeImageProcessor

    # This package's model code, not the folder's copy: a run's folder holds the code of the day it was trained, and
    # a release is made with today's (the export writes it into the release).
    model = BayesFakeDetector.from_pretrained(args.model_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    record_path, record = read_run_record(args.model_dir)
    if args.training_data:
        model.config.training_data = args.training_data
    if args.reject_score:  # before calibration: the reject rule is certified on this score
        model.config.reject_score = args.reject_score
    if args.reconstruction_metric and model.decoder is None:
        parser.error("--reconstruction-metric is for an autoencoder detector (config.decoder_widths set)")
    if args.domain_gate:
        if args.alpha is None:
            parser.error("--domain-gate needs --alpha: the reject rule is certified on in-domain images")
        attach_domain_gate(model, args.domain_gate, args.domain_weights)
    # The training images at their own side, decoded once: int8 calibration, the gate's fit and the stress sets.
    native = (native_splits(model, record, args.data, args.val_fraction, args.split_seed)
              if args.int8_calibration or args.domain_gate or args.stress else None)
    if args.int8_calibration:
        train_images, _ = subsample(*native["train"], args.int8_calibration, args.seed)
        model.quantize_int8(preprocess_uint8(BayesFakeImageProcessor.from_config(model.config), train_images))
    splits = evaluation_data(model, record, args.split, args.data, args.val_fraction, args.split_seed)
    splits = {key: subsample(*splits[key], args.max_eval, args.seed) for key in ("val", args.split)}
    gate_train = stress = None
    if args.domain_gate or args.stress:
        if args.domain_gate:
            gate_train = subsample(*native["train"], args.gate_images, args.seed)
        if model.domain_gate is not None and model.domain_gate.extractor is not None:
            # The gate reads the images resized from the originals (CIFAKE's 32 px), not from the detector's input.
            for key in ("val", args.split):
                images, labels = subsample(*native[key], args.max_eval, args.seed)
                if not np.array_equal(labels, splits[key][1]):
                    raise ValueError(f"the {key} split decoded at two sizes does not line up")
                splits[key] = (*splits[key][:2], gate_images(model, images))
        if args.stress:
            test_images, test_labels = subsample(*native[args.split], args.max_eval, args.seed)
            stress = stress_sets(model, test_images, test_labels, args.wild, seed=args.seed)
    model_dir = Path(args.model_dir).resolve()
    out_dir = Path(args.out) if args.out else model_dir.parent / f"eval_{args.split}"
    name = args.name or Path(args.export or model_dir).name
    report = calibrate_and_evaluate(model, splits, out_dir, args.num_samples, split=args.split, name=name,
                                    dataset=args.dataset_name, batch_size=args.batch_size, seed=args.seed,
                                    reject_rate=args.reject_rate, alpha=args.alpha, delta=args.delta,
                                    gate_train=gate_train, stress=stress,
                                    frozen_features=is_features(splits[args.split][0]))
    print(json.dumps(report["metrics"], indent=2))
    print(f"wrote {out_dir / 'report.md'}")
    if args.export:
        from hub_models.export import export_detector

        command = args.command or shlex.join([*shlex.split(prog), *argv])
        release = {k: v for k, v in (("version", args.version), ("notes", args.notes)) if v is not None}
        if args.reconstruction_metric == "perceptual_mahalanobis":  # its error density, fitted on the run's train
            from train.reconstruction_density import fit_reconstruction_density

            train_split = recorded_splits(record, decode_processor(model.config, 0), args.data, args.val_fraction,
                                          args.split_seed)["train"]
            fit_reconstruction_density(model, train_split[0], seed=args.seed)  # sets the metric
        elif args.reconstruction_metric:  # set here: no measurement above reads it, and "perceptual" costs 3x a pass
            model.config.reconstruction_metric = args.reconstruction_metric
        folder = export_detector(model, args.export, report=report, plots=[out_dir / p for p in report["plots"]],
                                 command=command, **release)
        if record_path is not None:  # the training record ships with the weights
            (Path(folder) / "train_history.json").write_text(record_path.read_text())
        print(f"exported the calibrated model to {folder}")
    return report


if __name__ == "__main__":
    main()
