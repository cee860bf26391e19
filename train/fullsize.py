"""The full-size detector, in one command: a frozen ImageNet backbone on several views of an image, an MC-Dropout head
trained on wild train, calibrated, gated and certified on a validation split carved from it, evaluated on wild test
per generator and per source, and exported as a Hub folder.

    python -m train.fullsize train/configs/fullsize/wild-effnetlite2-multiview.yaml \
        [--export hub_models/wild-effnetlite2-multiview --version 1.0.0] [--out runs/fullsize]

Steps (everything chosen on validation, test touched once at the end):
1. per-view backbone features of wild train and test (``train.wild.view_features``, cached and resumable);
2. validation = whole groups never seen in fitting (``val_groups``: a real source and generators) plus a seeded share
   of every other group; the rest fits the head;
3. for each view layout in ``layouts``, an MC-Dropout head on the mean of its views' features; the layout with the best
   validation ROC-AUC is kept;
4. domain gate (one Gaussian per class on the head's training features), temperature and threshold fitted on one half
   of validation (``train.calibration.calibration_halves``), the domain threshold there too (99% pass), and the
   reject rule certified on the other half with Learn-then-Test at ``alpha`` / ``delta``;
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

from hub_models import BayesFakeConfig, BayesFakeDetector
from hub_models.modeling_bayesfake import make_head
from train.abstention import selective_outcome
from train.calibration import calibrate_on_validation, calibration_halves, certify_reject_rule
from train.domain import attach_domain_gate, choose_domain_threshold, fit_domain_gate
from train.features import load_backbone_weights
from train.metrics import auroc, compute_metrics
from train.prediction import predict
from train.wild import layout_features, load_wild, view_features

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


def group_rows(preds, data, threshold: float, reject_entropy: float | None) -> list[dict]:
    """Per generator (AI images) and per source (real photos): accuracy, answered share, accuracy among answered."""
    rows = []
    wrong = preds.wrong(threshold)
    for kind, column in (("generator", data.generators), ("source", data.sources)):
        for name, label in sorted(set(zip(column, data.labels))):  # a source with both classes gets a row per class
            if name == "none":
                continue
            idx = np.flatnonzero((column == name) & (data.labels == label))
            outcome = selective_outcome(preds.predictive_entropy[idx], wrong[idx],
                                        None if preds.in_domain is None else preds.in_domain[idx], reject_entropy)
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
              f"alpha = 0.01 cannot be certified on so few calibration images. Validation: {report['val_n']} images "
              f"({', '.join(report['val_groups'])} held out whole), fitting: {report['fit_n']}.", ""]
    return "\n".join(lines)


def card_sections(report: dict) -> str:
    """What the exported card adds: per-group test numbers, the training data and its licences."""
    return ("\n## wild test, per generator and per source\n\n" + markdown_report(report).split("\n", 2)[2]
            + "\n## Training data and licences\n\n" + WILD_LICENCES + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.fullsize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML (train/configs/fullsize/*.yaml)")
    parser.add_argument("--out", default="runs/fullsize", help="report folder (report.json, report.md)")
    parser.add_argument("--export", help="write the detector as a Hub folder here (e.g. hub_models/NAME)")
    parser.add_argument("--version", default="1.0.0", help="release version of the export")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    cfg = yaml.safe_load(Path(args.config).read_text())
    model = BayesFakeDetector(BayesFakeConfig(**cfg["model"])).eval()
    load_backbone_weights(model, cfg["backbone_weights"])
    train, test = load_wild("train"), load_wild("test")
    train_views, test_views = view_features(model, train, "train"), view_features(model, test, "test")
    fit, val = validation_split(train, cfg["val_groups"], cfg["val_random_fraction"], cfg["seed"])
    y_fit, y_val = train.labels[fit], train.labels[val]

    layout_auroc, heads = {}, {}
    for hidden in cfg.get("head_hidden_choices", [cfg["model"].get("head_hidden", [])]):
        for layout in cfg["layouts"]:
            model.config.head_hidden = list(hidden)
            model.head = make_head(model.config, model.backbone.num_features)
            train_head(model, layout_features(train_views[fit], layout), y_fit, cfg["epochs"], cfg["lr"],
                       cfg["weight_decay"], cfg["seed"])
            preds = predict(model, layout_features(train_views[val], layout), y_val, progress=False)
            key = f"{layout} hidden={list(hidden)}"
            layout_auroc[key] = float(auroc(y_val, preds.p_fake))
            heads[key] = (layout, list(hidden), model.head)
            print(f"{key}: validation ROC-AUC {layout_auroc[key]:.4f}", flush=True)
    best = max(layout_auroc, key=layout_auroc.get)
    layout, hidden, model.head = heads[best]
    model.config.head_hidden = hidden
    model.config.view_layout = layout
    model.config.validate_bayesfake()
    x_fit, x_val = layout_features(train_views[fit], layout), layout_features(train_views[val], layout)
    x_test = layout_features(test_views, layout)

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
        "Diffusion), longer side <= 512 px, JPEG 90; seen through a frozen ImageNet EfficientNet-Lite2 on "
        f"{model.config.num_views} views ({layout}) of a copy at most {model.config.view_max_side} px on its longer side")

    preds = predict(model, x_test, test.labels, progress=False)
    metrics = compute_metrics(preds, model.config.threshold)
    metrics.update(selective_outcome(preds.predictive_entropy, preds.wrong(model.config.threshold), preds.in_domain,
                                     model.config.reject_entropy))
    report = {
        "name": cfg["name"], "dataset": "wild", "split": "test", "num_samples": int(model.config.num_samples),
        "layout": layout, "head_hidden": hidden, "layout_val_auroc": layout_auroc, "val_groups": cfg["val_groups"],
        "fit_n": int(len(fit)), "val_n": int(len(val)), "calibration": calibration,
        "domain_threshold": domain_threshold, "abstention": abstention,
        "reject_entropy": model.config.reject_entropy,
        "metrics": {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in metrics.items()},
        "groups": group_rows(preds, test, model.config.threshold, model.config.reject_entropy),
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
                                 notes="First release: a multi-view detector for full-size photos, trained on wild.")
        history = {"config": cfg, "layout_val_auroc": layout_auroc, "layout": layout, "fit_n": int(len(fit)),
                   "val_n": int(len(val)), "calibration": calibration, "seconds": report["seconds"]}
        (folder / "train_history.json").write_text(json.dumps(history, indent=2) + "\n")
        card = folder / "README.md"
        text = card.read_text()
        card.write_text(text.replace("\n## Release\n", card_sections(report) + "\n## Release\n", 1))
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
