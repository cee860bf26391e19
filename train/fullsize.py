"""The full-size detector, in one command: a frozen ImageNet backbone on several views of an image, an MC-Dropout head
trained on wild train, calibrated, gated and certified on a validation split carved from it, evaluated on wild test
per generator and per source, and exported as a Hub folder.

    python -m train.fullsize train/configs/fullsize/wild-effnetlite2-multiview.yaml \
        [--export hub_models/wild-effnetlite2-multiview --version 1.0.0] [--out runs/fullsize]

Steps (everything chosen on validation, test touched once at the end):
1. per-view backbone features of wild train and test (``train.wild.view_features``, cached and resumable);
2. validation, one of two kinds (``validation`` in the YAML):
   - ``held_out_groups`` (release 1.0.0 of wild-effnetlite2-multiview): whole groups never seen in fitting
     (``val_groups``: a real source and generators) plus a seeded share of every other group; the rest fits the head;
   - ``leave_one_group_out``: every group of wild train (a real source, or a generator) is held out once and predicted
     by a head trained on all the others (sklearn ``LeaveOneGroupOut``), so every one of the 1,235 train images gets an
     out-of-fold prediction made as test predictions are: by a model that never saw its source or generator. A
     temperature fitted on a random split of the same sources is over-confident on unseen ones;
3. for each view layout in ``layouts`` and head in ``head_hidden_choices``, an MC-Dropout head on the mean of its views'
   features; the best validation ROC-AUC wins (with ``layout_tolerance``: the layout with the fewest views within
   that of the best, since views cost time);
4. domain gate (one Gaussian per class on the head's training features), temperature and threshold fitted on one half
   of validation (``train.calibration.calibration_halves``), the domain threshold there too (99% pass), and the
   reject rule certified on the other half with Learn-then-Test at ``alpha`` / ``delta``. With
   ``leave_one_group_out`` these halves are of the out-of-fold predictions (the domain scores too come from gates
   fitted without the image's group), and the released head is then trained on all of wild train;
5. wild test: overall metrics and, per generator and per source, accuracy, answered share and accuracy among the
   answered (``report.json`` and ``report.md`` in ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.model_selection import LeaveOneGroupOut

from hub_models import BayesFakeConfig, BayesFakeDetector
from hub_models.configuration_bayesfake import VIEW_LAYOUTS
from hub_models.modeling_bayesfake import make_head
from train.calibration import (calibrate_on_validation, calibration_halves, certify_reject_rule,
                               certify_reject_rule_on, choose_thresholds, fit_temperature)
from train.domain import IN_DOMAIN_PASS, attach_domain_gate, choose_domain_threshold, domain_scores, fit_domain_gate
from train.group_transfer import choose_alpha, transfer_check
from train.features import load_backbone_weights
from train.metrics import auroc, calibration_metrics, compute_metrics
from train.prediction import Predictions, predict
from train.wild import layout_features, load_wild, view_features

VALIDATIONS = ("held_out_groups", "leave_one_group_out")
BACKBONE_NAMES = {"tf_efficientnet_lite0": "EfficientNet-Lite0", "tf_efficientnet_lite2": "EfficientNet-Lite2"}

WILD_LICENCES = (
    "wild (../shared/data/wild, development set): dcsan/imagen (renders of 2022 text-to-image models; no licence file), "
    "necenzurat/ai-image-filter (MIT), daniellionel01/spot-the-ai (MIT), BSDS500 (Berkeley; research use), Urban100, "
    "Sun-Hays80, Set5/Set14 (research-use super-resolution and denoising benchmarks), Kodak24 and McMaster "
    "(image-processing test sets), Debian wallpaper packages (GPL-2+/LGPL-3). Several sources carry no licence file: "
    "research and evaluation use only.")


def validation_split(data, val_groups: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, val): every image of ``val_groups`` plus a seeded ``fraction`` of each other group in val."""
    rng = np.random.default_rng(seed)
    group = data.group
    unknown = sorted(set(val_groups) - set(group))
    if unknown:
        raise ValueError(f"val_groups not in wild train: {unknown}; its groups are {sorted(set(group))}")
    val = np.isin(group, val_groups)
    for name in sorted(set(group) - set(val_groups)):
        members = np.flatnonzero(group == name)
        val[rng.choice(members, size=round(fraction * len(members)), replace=False)] = True
    return np.flatnonzero(~val), np.flatnonzero(val)


def train_head(model, features: np.ndarray, labels: np.ndarray, epochs: int, lr: float, weight_decay: float,
               seed: int, batch_size: int = 64) -> None:
    """Fit the MC-Dropout head on frozen features (dropout on, NLL of one sample: standard dropout training),
    classes weighted to balance them."""
    torch.manual_seed(seed)
    for module in model.head.modules():  # a fresh seeded start for every layout, whatever ran before
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    x, y = torch.from_numpy(features).float(), torch.from_numpy(labels).long()
    weights = torch.tensor(len(y) / (2.0 * np.bincount(labels, minlength=2)), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            rows = order[start:start + batch_size]
            logits = model.sample_head_logits(x[rows], len(rows), 1, stochastic=True)[0]
            loss = torch.nn.functional.cross_entropy(logits, y[rows], weight=weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def fresh_head(model, hidden: list[int]) -> None:
    """Give ``model`` a new, untrained head with hidden layers ``hidden`` (``config.head_hidden`` follows)."""
    model.config.head_hidden = list(hidden)
    model.head = make_head(model.config, model.backbone.num_features)


def group_folds(data, spread_groups=(), seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, held-out) indices, one fold per group of ``data`` (a real source or a generator): LeaveOneGroupOut.

    ``spread_groups`` are not held out whole: their images are dealt at random (seeded) over the other groups' folds.
    For wild train that is BSDS500, 500 of its 593 real photos: held out whole it would leave Urban100's 93 city
    pictures as the only real photos, a shift far harsher than test's (whose model saw both real sources), and every
    fold would hold one class only. Spread, each fold holds a generator (or Urban100) never seen in its fitting part,
    plus a share of BSDS500."""
    group = np.asarray(data.group).astype(object)
    unknown = sorted(set(spread_groups) - set(group))
    if unknown:
        raise ValueError(f"spread_groups not in the data: {unknown}; its groups are {sorted(set(group))}")
    whole = sorted(set(group) - set(spread_groups))
    if not whole:
        raise ValueError("every group is spread: no group is left to hold out")
    spread = np.flatnonzero(np.isin(group, list(spread_groups)))
    rng = np.random.default_rng(seed)
    group[spread] = [whole[i % len(whole)] for i in rng.permutation(len(spread))]
    return list(LeaveOneGroupOut().split(group, group, group))


def fold_heads(model, features: np.ndarray, labels: np.ndarray, folds, hidden: list[int], cfg: dict) -> list:
    """One trained head per fold, each on the fold's fitting part only."""
    heads = []
    for fit, _ in folds:
        fresh_head(model, hidden)
        train_head(model, features[fit], labels[fit], cfg["epochs"], cfg["lr"], cfg["weight_decay"], cfg["seed"])
        heads.append(model.head)
    return heads


def take(preds: Predictions, index) -> Predictions:
    """The predictions of the images ``index`` (sample logits too)."""
    fields = {name: (None if value is None else value[:, index] if name == "sample_logits" else value[index])
              for name, value in vars(preds).items() if name != "num_samples"}
    return Predictions(num_samples=preds.num_samples, **fields)


def out_of_fold_predictions(model, features: np.ndarray, labels: np.ndarray, folds, heads,
                            keep_sample_logits: bool = False) -> Predictions:
    """Every image predicted by the head of the fold that held it out (the model's own temperature, no gate), in the
    images' order: the detector's own inference path, ``predict``, once per fold."""
    order = np.concatenate([held for _, held in folds])
    parts = []
    for (_, held), head in zip(folds, heads):
        model.head = head
        parts.append(predict(model, features[held], labels[held], progress=False,
                             keep_sample_logits=keep_sample_logits))
    merged = {}
    for name, value in vars(parts[0]).items():
        if name == "num_samples" or value is None:
            continue
        axis = 1 if name == "sample_logits" else 0
        stacked = np.concatenate([getattr(part, name) for part in parts], axis=axis)
        merged[name] = np.empty_like(stacked)
        if axis:
            merged[name][:, order] = stacked
        else:
            merged[name][order] = stacked
    return Predictions(num_samples=parts[0].num_samples, **merged)


def out_of_fold_domain_scores(model, features: np.ndarray, labels: np.ndarray, folds) -> np.ndarray:
    """Each image's domain score under a gate fitted on its fold's fitting part only (so a held-out source or
    generator looks as far from the training data as an unseen one at test time). Leaves the model without a gate."""
    scores = np.empty(len(labels), dtype=np.float64)
    for fit, held in folds:
        attach_domain_gate(model, "features")
        fit_domain_gate(model, features[fit], labels[fit], progress=False)
        scores[held] = domain_scores(model, features[held], progress=False)
    model.domain_gate, model.config.domain_gate, model.config.domain_threshold = None, None, None
    return scores


def choose_layout(val_auroc: dict[str, float], candidates: dict, tolerance: float) -> str:
    """The candidate with the best validation ROC-AUC, or with ``tolerance`` > 0 the one with the fewest views (then
    the best ROC-AUC) among those within ``tolerance`` of the best."""
    best = max(val_auroc, key=val_auroc.get)
    close = [key for key, value in val_auroc.items() if value >= val_auroc[best] - tolerance]
    return min(close, key=lambda key: (VIEW_LAYOUTS[candidates[key][0]], -val_auroc[key]))


def calibrate_grouped(model, x_train: np.ndarray, data, folds, heads, cfg: dict) -> dict:
    """Temperature, threshold, domain threshold and certified reject rule of ``model`` from out-of-fold predictions of
    wild train (``heads``, one per group held out): the first stratified half fits the temperature, the threshold and
    the domain threshold (99% of its out-of-fold domain scores pass), the second certifies the reject rule.
    ``model`` must carry its final head and fitted gate; they are put back after the fold heads are used."""
    labels = data.labels
    final_head, final_gate = model.head, model.domain_gate
    gate_config = (model.config.domain_gate, model.config.domain_threshold)
    model.domain_gate, model.config.domain_gate = None, None
    scores = out_of_fold_domain_scores(model, x_train, labels, folds)
    half_fit, half_certify = calibration_halves(labels, cfg["seed"])
    model.config.calibration_temperature = 1.0
    raw = out_of_fold_predictions(model, x_train, labels, folds, heads, keep_sample_logits=True)
    before = calibration_metrics(take(raw, half_fit))
    model.config.calibration_temperature = fit_temperature(raw.sample_logits[:, half_fit], labels[half_fit])
    preds = out_of_fold_predictions(model, x_train, labels, folds, heads)
    after = calibration_metrics(take(preds, half_fit))
    thresholds = choose_thresholds(take(preds, half_fit), rule=model.config.threshold_rule)
    model.config.threshold = thresholds["chosen"]
    domain_threshold = float(np.quantile(scores[half_fit], IN_DOMAIN_PASS, method="higher"))
    preds.domain_score, preds.in_domain = scores.astype(np.float32), scores <= domain_threshold
    # The rule's level: the loosest alpha whose rule, fitted without a group, keeps that group's answered accuracy
    # (alpha_choices; a single alpha without them, as release 1.0.0).
    checks = [transfer_check(raw, scores, fold_names(data, folds), alpha, cfg["delta"], cfg["seed"],
                             model.config.threshold_rule)
              for alpha in cfg.get("alpha_choices", [])]
    transfer = (choose_alpha(checks, cfg["transfer_target_accuracy"], cfg["transfer_min_answered"])
                if checks else None)
    alpha = transfer["alpha"] if transfer else cfg["alpha"]
    abstention = certify_reject_rule_on(model, take(preds, half_certify), alpha, cfg["delta"])
    model.head, model.domain_gate = final_head, final_gate
    model.config.domain_gate, model.config.domain_threshold = gate_config[0], domain_threshold
    certify_part = take(preds, half_certify)
    return {
        "thresholds": thresholds, "domain_threshold": domain_threshold, "abstention": abstention,
        "calibration": {"temperature": model.config.calibration_temperature,
                        "threshold_rule": model.config.threshold_rule,
                        "fit_n": int(len(half_fit)), "certify_n": int(len(half_certify)),
                        "oof_nll_before": before["cal/nll"], "oof_nll_after": after["cal/nll"],
                        "oof_ece_before": before["cal/ece"], "oof_ece_after": after["cal/ece"],
                        "oof_auroc": float(auroc(labels, preds.p_fake)),
                        "oof_ece_certify_half": calibration_metrics(certify_part)["cal/ece"],
                        "oof_in_domain_share": float(preds.in_domain.mean())},
        "transfer": transfer, "transfer_checks": [{k: v for k, v in c.items() if k != "groups"} for c in checks],
    }


def fold_names(data, folds) -> np.ndarray:
    """For every image, the group its fold held out whole (a generator, or Urban100): spread groups' images are named
    after the fold they were dealt to."""
    names = np.empty(len(data), dtype=object)
    group = np.asarray(data.group)
    for _, held in folds:
        counts = {g: int((group[held] == g).sum()) for g in set(group[held])}
        whole = [g for g in counts if counts[g] == int((group == g).sum())]
        if len(whole) != 1:
            raise ValueError(f"a fold holds out {len(whole)} whole groups ({whole}); expected exactly one")
        names[held] = whole[0]
    return names


def group_rows(preds, data, model) -> list[dict]:
    """Per generator (AI images) and per source (real photos): accuracy, answered share, accuracy among answered,
    under ``model``'s threshold and reject rule (no answer at all when its rule could not be certified, as its
    verdicts do)."""
    rows = []
    wrong = preds.wrong(model.config.threshold)
    for kind, column in (("generator", data.generators), ("source", data.sources)):
        for name, label in sorted(set(zip(column, data.labels))):  # a source with both classes gets a row per class
            if name == "none":
                continue
            idx = np.flatnonzero((column == name) & (data.labels == label))
            outcome = take(preds, idx).answered_outcome(model)
            rows.append({"kind": kind, "name": str(name), "n": int(len(idx)),
                         "label": "FAKE" if label == 1 else "REAL",
                         "acc": float(1 - wrong[idx].mean()), "mean_p_fake": float(preds.p_fake[idx].mean()),
                         "answered": outcome["sc/coverage"], "answered_acc": outcome["sc/answered_acc"],
                         "outside": outcome["ood/outside_share"], "uncertain": outcome["sc/review_share"]})
    return rows


def pct(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def markdown_report(report: dict) -> str:
    m = report["metrics"]
    lines = [
        f"# {report['name']}: wild test (unseen sources and generators), T={report['num_samples']}",
        "",
        f"Layout `{report['layout']}`, head hidden layers {report['head_hidden']} chosen on validation "
        "(ROC-AUC per layout and head: "
        + ", ".join(f"{k} {v:.3f}" for k, v in report["layout_val_auroc"].items()) + ").",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        f"| ROC-AUC | {m['cls/auroc']:.3f} | >= 0.90 |",
        f"| accuracy (all, threshold {m['meta/threshold']:.3f}) | {pct(m['cls/acc'])} | |",
        f"| ECE (15 bins) | {m['cal/ece']:.3f} | <= 0.05 |",
        f"| error-detection AUROC (predictive entropy) | {m['sc/auroc_entropy']:.3f} | >= 0.80 |",
        f"| answered (in domain, entropy <= rule) | {pct(m['sc/coverage'])} | >= 80% |",
        f"| accuracy among answered | {pct(m['sc/answered_acc'])} | >= 90% |",
        f"| outside the domain (gate) | {pct(m['ood/outside_share'])} | |",
        f"| uncertain (sent to review) | {pct(m['sc/review_share'])} | |",
        "",
        "| generator / source | class | images | accuracy (all) | mean P(FAKE) | answered | accuracy (answered) | "
        "outside | uncertain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["groups"]:
        lines.append(f"| {r['kind']}: {r['name']} | {r['label']} | {r['n']} | {pct(r['acc'])} | {r['mean_p_fake']:.2f} "
                     f"| {pct(r['answered'])} | {pct(r['answered_acc'])} | {pct(r['outside'])} | "
                     f"{pct(r['uncertain'])} |")
    a = report["abstention"]
    lines += ["", f"Reject rule: answer when in domain and predictive entropy <= {report['reject_entropy']} nats, "
              f"certified on {a['calibration_n']} validation images (Learn-then-Test, alpha = {a['alpha']}, "
              f"delta = {a['delta']}; certified: {a['certified']}, calibration coverage {pct(a['coverage'])}). "
              f"alpha = 0.01 cannot be certified on so few calibration images. " + validation_text(report), ""]
    checks = report["calibration"].get("transfer_checks") if isinstance(report.get("calibration"), dict) else None
    if checks:
        lines += ["Leave-one-group-out check of the calibration (temperature, threshold, domain threshold and rule "
                  "fitted without each group, applied to it), per level alpha:", "",
                  "| alpha | answered | accuracy (answered) | worst group's accuracy (answered) | ECE "
                  "| worst group's ECE | ROC-AUC | error-detection AUROC |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['alpha']} | {pct(c['answered'])} | {pct(c['answered_acc'])} | "
                  f"{pct(c['worst_group_answered_acc'])} | {c['ece']:.3f} | {c['worst_group_ece']:.3f} | "
                  f"{c['auroc']:.3f} | {c['error_detection_auroc']:.3f} |" for c in checks]
        lines += ["", f"Chosen: alpha = {report['calibration']['transfer']['alpha']}.", ""]
    return "\n".join(lines)


def validation_text(report: dict) -> str:
    """How validation was made, in words (the report's and the card's)."""
    if report.get("validation", "held_out_groups") == "held_out_groups":
        return (f"Validation: {report['val_n']} images ({', '.join(report['val_groups'])} held out whole), "
                f"fitting: {report['fit_n']}.")
    c = report["calibration"]["calibration"]
    return (f"Validation: out-of-fold predictions of all {report['val_n']} wild train images, each by a head trained "
            f"with its whole group left out (leave-one-group-out over {len(report['val_groups'])} groups: "
            f"{', '.join(report['val_groups'])}; {', '.join(report['spread_groups']) or 'no group'} dealt at random "
            f"over those folds instead); temperature ({c['temperature']:.3f}), threshold and domain threshold "
            f"fitted on {c['fit_n']} of them, the rule certified on the other {c['certify_n']}; out-of-fold ROC-AUC "
            f"{c['oof_auroc']:.3f}, ECE {c['oof_ece_before']:.3f} before and {c['oof_ece_after']:.3f} after the "
            f"temperature ({c['oof_ece_certify_half']:.3f} on the certifying half). The released head is trained on "
            f"all {report['fit_n']} train images.")


def cannot_judge(report: dict) -> str:
    """The card's "what it cannot judge": the test groups where it is wrong too often even when it answers, and what
    its training data never showed it."""
    a, m = report["abstention"], report["metrics"]
    weak = [f"{r['name']} ({r['label']}: {pct(r['answered_acc'])} right among the {pct(r['answered'])} answered)"
            for r in report["groups"] if r["answered_acc"] == r["answered_acc"] and r["answered_acc"] < 0.9]
    return ("\n## What it cannot judge\n\n"
            + ("On wild test it is wrong more than one time in ten even where it answers on: " + "; ".join(weak) + ". "
               if weak else "")
            + "It learned from 2 real photo collections and 7 generators of 2021-2022 (longer side <= 512 px, JPEG "
            "90): photorealistic images of newer generators, photos edited, filtered, screenshotted or re-encoded "
            "many times, drawings and renders, and photos of screens are outside what it saw, and its domain gate "
            "does not flag most of them (its Gaussians are fitted on features of wild train only). Treat "
            "\"likely real\" as \"no generator trace of the kinds it learned\", not as proof.\n\n"
            f"Its guarantee (at most {a['alpha']:.0%} wrong among the answered, with probability >= "
            f"{1 - a['delta']:.0%}) holds for images exchangeable with its calibration images: out-of-fold predictions "
            "of wild train, made by heads that each left one generator (or Urban100) out, while the released head saw "
            "all of wild train. " + transfer_text(report.get("calibration", {}).get("transfer"))
            + "wild test shares none of their sources or generators, and there "
            f"{pct(m['sc/answered_risk'])} of the answered were wrong: "
            + ("the bound held on that shift too (an observation on 400 images, not a guarantee).\n"
               if m["sc/answered_risk"] <= a["alpha"] else "the bound did not carry over to that shift.\n"))


def transfer_text(transfer: dict | None) -> str:
    """The card's words on how the rule's level was chosen by the leave-one-group-out check of calibration."""
    if not transfer:
        return ""
    return (f"Its level alpha = {transfer['alpha']} was chosen as the loosest of several whose rule, with "
            "temperature, threshold, domain threshold and rule all fitted without one group, kept every held-out "
            f"group (each generator, and Urban100) at >= {pct(transfer['target_accuracy'])} right among its answered, "
            f"answering >= {pct(transfer['min_answered'])} of all: worst group "
            f"{pct(transfer['worst_group_answered_acc'])}, {pct(transfer['answered'])} of all answered, ECE "
            f"{transfer['ece']:.3f} (worst group {transfer['worst_group_ece']:.3f})"
            + ("" if transfer["meets_target"] else "; no level met both, so the strictest was taken")
            + ". That is evidence that the rule survives an unseen generator of the kinds it learned from, not a "
            "guarantee for any new one. ")


def card_sections(report: dict) -> str:
    """What the exported card adds: per-group test numbers, what it cannot judge, the training data and its
    licences."""
    sections = "\n## wild test, per generator and per source\n\n" + markdown_report(report).split("\n", 2)[2]
    if report.get("validation", "held_out_groups") != "held_out_groups":  # release 1.0.0's card stays as it was
        sections += cannot_judge(report)
    return sections + "\n## Training data and licences\n\n" + WILD_LICENCES + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.fullsize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML (train/configs/fullsize/*.yaml)")
    parser.add_argument("--out", default="runs/fullsize", help="report folder (report.json, report.md)")
    parser.add_argument("--export", help="write the detector as a Hub folder here (e.g. hub_models/NAME)")
    parser.add_argument("--version", default="1.0.0", help="release version of the export")
    parser.add_argument("--validation-only", action="store_true",
                        help="stop after choosing and calibrating on validation: print it, never touch wild test")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    cfg = yaml.safe_load(Path(args.config).read_text())
    model = BayesFakeDetector(BayesFakeConfig(**cfg["model"])).eval()
    load_backbone_weights(model, cfg["backbone_weights"])
    train, test = load_wild("train"), load_wild("test")
    train_views, test_views = view_features(model, train, "train"), view_features(model, test, "test")
    validation = cfg.get("validation", "held_out_groups")
    if validation not in VALIDATIONS:
        raise ValueError(f"validation must be one of {VALIDATIONS}; got {validation!r}")
    grouped = validation == "leave_one_group_out"
    if grouped:  # every image is validation once, predicted by a head that never saw its group
        folds = group_folds(train, cfg.get("spread_groups", []), cfg["seed"])
        fit, val = np.arange(len(train)), np.arange(len(train))
    else:
        fit, val = validation_split(train, cfg["val_groups"], cfg["val_random_fraction"], cfg["seed"])
    y_fit, y_val = train.labels[fit], train.labels[val]

    layout_auroc, heads = {}, {}
    for hidden in cfg.get("head_hidden_choices", [cfg["model"].get("head_hidden", [])]):
        for layout in cfg["layouts"]:
            key = f"{layout} hidden={list(hidden)}"
            if grouped:
                x_layout = layout_features(train_views, layout)
                heads[key] = (layout, list(hidden), fold_heads(model, x_layout, train.labels, folds, hidden, cfg))
                model.config.calibration_temperature = 1.0
                preds = out_of_fold_predictions(model, x_layout, train.labels, folds, heads[key][2])
            else:
                fresh_head(model, hidden)
                train_head(model, layout_features(train_views[fit], layout), y_fit, cfg["epochs"], cfg["lr"],
                           cfg["weight_decay"], cfg["seed"])
                preds = predict(model, layout_features(train_views[val], layout), y_val, progress=False)
                heads[key] = (layout, list(hidden), model.head)
            layout_auroc[key] = float(auroc(y_val, preds.p_fake))
            print(f"{key}: validation ROC-AUC {layout_auroc[key]:.4f}", flush=True)
    best = choose_layout(layout_auroc, heads, cfg.get("layout_tolerance", 0.0))
    layout, hidden, chosen_head = heads[best]
    model.config.head_hidden = hidden
    model.config.view_layout = layout
    model.config.validate_bayesfake()
    x_fit, x_val = layout_features(train_views[fit], layout), layout_features(train_views[val], layout)
    x_test = layout_features(test_views, layout)

    if grouped:  # the released head: trained on all of wild train; its calibration from the fold heads' predictions
        fresh_head(model, hidden)
        train_head(model, x_fit, y_fit, cfg["epochs"], cfg["lr"], cfg["weight_decay"], cfg["seed"])
        attach_domain_gate(model, "features")
        fit_domain_gate(model, x_fit, y_fit, progress=False)
        fitted = calibrate_grouped(model, x_fit, train, folds, chosen_head, cfg)
        calibration, domain_threshold, abstention = fitted, fitted["domain_threshold"], fitted["abstention"]
    else:
        model.head = chosen_head
        attach_domain_gate(model, "features")
        fit_domain_gate(model, x_fit, y_fit, progress=False)
        half_fit, half_certify = calibration_halves(y_val, cfg["seed"])
        domain_threshold = choose_domain_threshold(model, x_val[half_fit], progress=False)
        calibration = calibrate_on_validation(model, x_val[half_fit], y_val[half_fit], progress=False)
        abstention = certify_reject_rule(model, x_val[half_certify], y_val[half_certify], alpha=cfg["alpha"],
                                         delta=cfg["delta"], progress=False)
    model.config.training_data = list(cfg["model"].get("training_data", ["wild"]))
    model.config.training_domain = (
        "wild train: real photographs (BSDS500, Urban100) and images of 7 text-to-image generators of 2021-2022 "
        "(dalle-mini, GLID-3-XL, latent diffusion, Simulacra, Stable Diffusion 2022, Disco Diffusion, Majesty "
        f"Diffusion), longer side <= 512 px, JPEG 90; seen through a frozen ImageNet "
        f"{BACKBONE_NAMES.get(model.config.backbone, model.config.backbone)} on "
        f"{model.config.num_views} views ({layout}) of a copy at most {model.config.view_max_side} px on its longer "
        "side")

    if args.validation_only:
        print(json.dumps({"layout_val_auroc": layout_auroc, "chosen": best, "calibration": calibration,
                          "domain_threshold": domain_threshold, "abstention": abstention}, indent=2, default=float))
        return
    preds = predict(model, x_test, test.labels, progress=False)
    metrics = compute_metrics(preds, model.config.threshold)
    metrics.update(preds.answered_outcome(model))
    report = {
        "name": cfg["name"], "dataset": "wild", "split": "test", "num_samples": int(model.config.num_samples),
        "layout": layout, "head_hidden": hidden, "layout_val_auroc": layout_auroc, "validation": validation,
        "val_groups": sorted(set(train.group) - set(cfg.get("spread_groups", []))) if grouped else cfg["val_groups"],
        "spread_groups": cfg.get("spread_groups", []),
        "fit_n": int(len(fit)), "val_n": int(len(val)), "calibration": calibration,
        "domain_threshold": domain_threshold, "abstention": abstention,
        "reject_entropy": model.config.reject_entropy,
        "metrics": {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in metrics.items()},
        "groups": group_rows(preds, test, model),
        "seconds": round(time.time() - started, 1),
        "command": "python -m train.fullsize " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    print(markdown_report(report), flush=True)
    if args.export:
        from hub_models.export import export_detector

        folder = export_detector(model, args.export, report, command=report["command"], version=args.version,
                                 notes=cfg.get("notes", "First release: a multi-view detector for full-size "
                                                            "photos, trained on wild."))
        # The config as trained: the model section with the layout and head chosen on validation.
        trained = {**cfg, "model": {**cfg["model"], "head_hidden": hidden, "view_layout": layout}}
        history = {"config": trained, "layout_val_auroc": layout_auroc, "layout": layout, "fit_n": int(len(fit)),
                   "val_n": int(len(val)), "calibration": calibration, "seconds": report["seconds"]}
        (folder / "train_history.json").write_text(json.dumps(history, indent=2) + "\n")
        card = folder / "README.md"
        text = card.read_text()
        card.write_text(text.replace("\n## Release\n", card_sections(report) + "\n## Release\n", 1))
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
