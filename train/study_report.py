"""The study's report, written from its results store: results.csv (every cell x test set), results.md (the choices
made on validation and what they score on test, per experiment) and heatmap PNGs.

Nothing here fits or measures: every number is read from the store that ``train.study`` filled.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from train.plots import save_figure

CELL_KEYS = ("experiment", "backbone", "train", "classifier", "reduction", "train_tf", "test_tf", "geometry", "holdout")
METRIC_KEYS = ("acc", "auroc", "ece", "nll", "err_auroc", "err_auroc_std", "err_auroc_mi", "acc_at_reject10", "n")
ROOT = Path(__file__).resolve().parent.parent


def result_rows(records: list[dict]) -> list[dict]:
    """One flat row per (cell, test set): the cell, its validation scores (what chose it) and its test scores."""
    rows = []
    for record in records:
        val = record["results"]["val"]
        for test, metrics in record["results"].items():
            if test == "val":
                continue
            row = {k: record["cell"][k] for k in CELL_KEYS}
            row["test"] = test
            row["reduction_dim"] = record.get("reduction_dim", 0)
            row["params"] = json.dumps(record.get("params", {}), sort_keys=True)
            row["val_acc"], row["val_auroc"], row["val_nll"] = val["acc"], val["auroc"], val["nll"]
            row.update({k: metrics.get(k) for k in METRIC_KEYS})
            row["groups"] = json.dumps(metrics.get("groups", {}), sort_keys=True)
            row["seconds"] = record.get("seconds")
            rows.append(row)
    return rows


def _num(v) -> float:
    return math.nan if v is None else float(v)


def best_on_validation(rows: list[dict]) -> dict | None:
    """The row with the lowest validation NLL (the calibrated predictive's own score; ties: higher val accuracy)."""
    rows = [r for r in rows if not math.isnan(_num(r["val_nll"]))]
    return min(rows, key=lambda r: (_num(r["val_nll"]), -_num(r["val_acc"]))) if rows else None


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def metric_cells(row: dict) -> str:
    return " | ".join(_fmt(row[k]) for k in ("acc", "auroc", "ece", "err_auroc"))


METRIC_HEAD = "test acc | ROC-AUC | ECE | err-det. AUROC"


def heatmap(matrix: np.ndarray, rows: list[str], cols: list[str], title: str, path: Path, vmin=0.5, vmax=1.0,
            label: str = "test accuracy") -> None:
    fig = Figure(figsize=(1.3 + 1.25 * len(cols), 1.0 + 0.38 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] < (vmin + vmax) / 2 else "black")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def _timing(store) -> tuple[list[dict], float, float]:
    """The recorded invocations, the sum of their times, and the span from the first start to the last end (shorter
    than the sum when workers ran side by side)."""
    runs = [r for r in store.records.values() if '"timing": "run"' in r["id"]]
    starts = [json.loads(r["id"])["started"] for r in runs]
    span = max(s + r["seconds"] for s, r in zip(starts, runs)) - min(starts) if runs else 0.0
    return runs, sum(r["seconds"] for r in runs), span


def write_report(cfg, store, refused: dict, cells: list[dict], test_counts: dict | None = None) -> list[str]:
    """Write results.csv, results.md and the heatmaps into ``cfg.out_dir``; return the paths written.
    ``test_counts``: {test set: (images, FAKE images)}, for the majority-class baseline next to the accuracies."""
    from train.study import cell_id  # the store's key of a cell

    out = Path(cfg.out_dir)
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    records = [store.get(cell_id(c)) for c in cells]
    missing = sum(r is None for r in records) - sum(c["backbone"] in refused for c in cells)
    records = [r for r in records if r is not None]
    rows = result_rows(records)
    written = []
    with open(out / "results.csv", "w", newline="") as handle:
        fields = [*CELL_KEYS, "test", "reduction_dim", "params", "val_acc", "val_auroc", "val_nll", *METRIC_KEYS,
                  "seconds", "groups"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    written.append(str(out / "results.csv"))
    lines = _header(cfg, store, refused, len(cells), len(records), missing)
    if test_counts:
        lines += ["Test sets (accuracy is read against the majority class; ROC-AUC is not affected by it): "
                  + "; ".join(f"{name} {n} images, {fake} FAKE (always answering "
                              f"{'FAKE' if fake >= n - fake else 'REAL'} scores {max(fake, n - fake) / n:.3f})"
                              for name, (n, fake) in test_counts.items()), ""]
    lines += _main_section(rows, out, written)
    lines += _shortcut_section(rows, store)
    lines += _logo_section(rows)
    lines += _crops_section(rows)
    lines += _transform_section(rows, out, written)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    written.append(str(out / "results.md"))
    return written


def _header(cfg, store, refused, n_cells, n_done, missing) -> list[str]:
    runs, total, span = _timing(store)
    # The command that filled the store (the last recorded invocation's), not a later --report-only.
    command = next((r["command"] for r in runs[::-1] if r.get("command")), None) or cfg.command or \
        f"bayesfake study train/configs/study/{cfg.name}.yaml"
    # Feature time: each invocation's own, plus its worker processes' (``run_study(workers=N)``).
    extraction = sum(r.get("extraction_seconds", 0) for r in store.records.values() if '"timing"' in r["id"])
    workers = sorted({r.get("workers", 1) for r in runs}) or [1]
    loads = [x for r in runs for x in r.get("load_average", [])]
    machine = (f"load average {min(loads):.1f}-{max(loads):.1f} at the invocations' starts and ends" if loads else
               "on a machine shared with other jobs (so slower than on a quiet one)")
    cell_seconds = sum(r.get("seconds", 0) for r in store.records.values() if "cell" in r)
    lines = [f"# The backbone x classifier study ({cfg.name})", "",
             "Written by `train/study_report.py` from the results store; every number was measured by the command "
             "below. Rows are chosen on validation and reported on test.", "",
             f"- Command: `{command}`",
             f"- Cells: {n_done} of {n_cells} finished" + (f" ({missing} not yet computed: a partial run; rerun the "
                                                          "command to finish it)" if missing > 0 else ""),
             f"- Time: {total:.0f} s ({total / 60:.1f} min) summed over {len(runs)} recorded invocation(s) of the "
             f"command, {span / 60:.1f} min from the first start to the last end (the cells took {cell_seconds:.0f} s "
             f"summed over processes, {extraction:.0f} s of it extracting and loading features), "
             f"{' or '.join(map(str, workers))} worker process(es) of 1 torch / OpenMP thread each, {machine}; "
             f"{os.cpu_count()} cores on the machine that wrote this report",
             f"- Data: CIFAKE subsets (balanced, seed {cfg.seed}) train {cfg.cifake_train}, val {cfg.cifake_val} from "
             f"CIFAKE train; test {cfg.cifake_test} from CIFAKE test. wild: train split carved into train / val "
             f"({cfg.wild_val_fraction:.0%} of each generator and of the real photos, seed {cfg.seed}); test = wild "
             "test (400 images; sources and generators never seen in train)",
             "- Features: frozen ImageNet backbones at their input size (Lite0 224, Lite2 260, MobileNetV2 224 px; "
             "the CIFAKE CNN at 32 px: its 192-d penultimate features); images resized on the shorter side and "
             "centre-cropped (the detectors' own preprocessing) unless a row says otherwise",
             f"- Every row: StandardScaler -> reduction -> classifier; C of the logistic probe and the SVMs chosen by "
             f"validation ROC-AUC; PCA / autoencoder size chosen from {cfg.reduction_dims} by the logistic probe's "
             f"validation ROC-AUC; {cfg.bootstrap} stratified bootstrap refits (the sampled predictive), each "
             f"calibrated on validation ({cfg.calibration}: "
             + ("a temperature and a bias on its score" if cfg.calibration == "sigmoid" else "isotonic") + "); "
             "P(FAKE) = their mean; threshold 0.5",
             "- Columns: accuracy, ROC-AUC, ECE (15 bins, top label), error-detection AUROC (predictive entropy of the "
             "ensemble flags the wrong answers); 'best' = lowest validation NLL",
             ]
    for name, reason in refused.items():
        lines.append(f"- Refused backbone `{name}`: {reason}")
    return lines + [""]


def _pairs(rows, experiment):
    return sorted({(r["train"], r["test"]) for r in rows if r["experiment"] == experiment})


def _main_section(rows, out: Path, written: list) -> list[str]:
    main = [r for r in rows if r["experiment"] == "main"]
    if not main:
        return []
    lines = ["## Backbone x classifier x reduction (train on A, test on B)", "",
             f"| train -> test | best on validation (backbone, classifier, reduction) | val acc | {METRIC_HEAD} |",
             "|---|---|---|---|---|---|---|"]
    for train, test in _pairs(main, "main"):
        best = best_on_validation([r for r in main if r["train"] == train and r["test"] == test])
        lines.append(f"| {train} -> {test} | {best['backbone']}, {best['classifier']}, {best['reduction']}"
                     f"{'' if best['reduction'] == 'none' else ' ' + str(best['reduction_dim'])} | "
                     f"{_fmt(best['val_acc'])} | {metric_cells(best)} |")
    lines += ["", "Best row per backbone (chosen on validation among its classifiers and reductions):", "",
              f"| train -> test | backbone | classifier, reduction | {METRIC_HEAD} |", "|---|---|---|---|---|---|---|"]
    for train, test in _pairs(main, "main"):
        for backbone in sorted({r["backbone"] for r in main}):
            best = best_on_validation([r for r in main if (r["train"], r["test"], r["backbone"]) ==
                                       (train, test, backbone)])
            if best:
                lines.append(f"| {train} -> {test} | {backbone} | {best['classifier']}, {best['reduction']} | "
                             f"{metric_cells(best)} |")
    reductions = sorted({r["reduction"] for r in main})
    lines += ["", "Reduction: mean test accuracy over the (backbone, classifier) pairs that have every reduction "
              "(how many in the last column):", "",
              "| train -> test | " + " | ".join(reductions) + " | pairs |", "|---|" + "---|" * (len(reductions) + 1)]
    for train, test in _pairs(main, "main"):
        acc = {(r["backbone"], r["classifier"], r["reduction"]): _num(r["acc"]) for r in main
               if (r["train"], r["test"]) == (train, test)}
        pairs = {(b, c) for b, c, _ in acc if all((b, c, red) in acc for red in reductions)}
        means = [np.mean([acc[(b, c, red)] for b, c in pairs]) if pairs else math.nan for red in reductions]
        lines.append(f"| {train} -> {test} | " + " | ".join(_fmt(float(m)) for m in means) + f" | {len(pairs)} |")
    # Heatmaps: classifier x backbone, each cell the reduction chosen on validation.
    lines += ["", "Heatmaps (classifier x backbone, the reduction chosen on validation per cell): "]
    classifiers = list(dict.fromkeys(r["classifier"] for r in main))
    backbones = list(dict.fromkeys(r["backbone"] for r in main))
    tables = []
    for train, test in _pairs(main, "main"):
        for metric, lo in (("acc", 0.5), ("auroc", 0.5)):
            matrix = np.full((len(classifiers), len(backbones)), np.nan)
            for i, clf in enumerate(classifiers):
                for j, bb in enumerate(backbones):
                    best = best_on_validation([r for r in main if (r["train"], r["test"], r["classifier"],
                                                                   r["backbone"]) == (train, test, clf, bb)])
                    matrix[i, j] = _num(best[metric]) if best else np.nan
            name = f"heatmap_{metric}_train-{train}_test-{test.replace('_test', '')}.png"
            heatmap(matrix, classifiers, backbones, f"train {train} -> test {test}: test {metric}", out / name,
                    vmin=lo, label=f"test {metric}")
            written.append(str(out / name))
            lines.append(f"[{name}]({name})")
            tables.append((train, test, metric, matrix))
    lines.append("")
    for train, test in _pairs(main, "main"):
        acc, auc = [m for tr, te, _, m in tables if (tr, te) == (train, test)]
        lines += [f"train {train} -> test {test}: test accuracy / ROC-AUC (reduction chosen on validation)", "",
                  "| classifier | " + " | ".join(backbones) + " |", "|---|" + "---|" * len(backbones)]
        lines += [f"| {clf} | " + " | ".join(f"{_fmt(float(acc[i, j]))} / {_fmt(float(auc[i, j]))}"
                                          for j in range(len(backbones))) + " |" for i, clf in enumerate(classifiers)]
        lines.append("")
    wild_best = best_on_validation([r for r in main if r["train"] == "wild" and r["test"] == "wild_test"])
    if wild_best:
        lines += _groups_table(wild_best, "Best wild -> wild row per generator (FAKE: share caught) and per source "
                                          "(REAL: share passed)")
    return lines


def _groups_table(row: dict, title: str) -> list[str]:
    groups = json.loads(row["groups"])
    lines = [f"{title}: {row['backbone']}, {row['classifier']}, {row['reduction']}", "",
             "| generator / source | accuracy | n |", "|---|---|---|"]
    lines += [f"| {g} | {acc:.3f} | {n} |" for g, (acc, n) in sorted(groups.items())]
    return lines + [""]


def _shortcut_section(rows, store) -> list[str]:
    short = [r for r in rows if r["experiment"] == "shortcut"]
    probe = next((r["probe"] for r in store.records.values() if "probe" in r), None)
    if not short and probe is None:
        return []
    lines = ["## Shortcut check: frame, resolution, image size", ""]
    if probe:
        t = probe["wild_test"]
        v = probe["wild_val"]
        lines += [f"A random forest on the stored image size alone (width, height, aspect ratio, pixels, square or "
                  f"not), fitted on wild train: ROC-AUC {_fmt(v['auroc'])} on wild val, {_fmt(t['auroc'])} on wild "
                  f"test (accuracy {_fmt(t['acc'])}). Square images in wild test: {t['square_share_real']:.1%} of "
                  f"the real photos, {t['square_share_fake']:.1%} of the AI images.", ""]
    main = [r for r in rows if r["experiment"] == "main" and r["train"] == "wild" and r["test"] == "wild_test"
            and r["reduction"] == "none"]
    lines += ["wild -> wild test, same classifier and backbone, three geometries (centre crop = every other row of "
              "this report; squash = whole frame, aspect distorted; lowres = every image first brought to a 128 px "
              "shorter side):", "",
              "| backbone | classifier | centre: acc / AUC | squash: acc / AUC | lowres: acc / AUC |",
              "|---|---|---|---|---|"]
    for bb in sorted({r["backbone"] for r in short}):
        for clf in list(dict.fromkeys(r["classifier"] for r in short)):
            cells = []
            for geometry, pool in (("centre", main), ("squash", short), ("lowres", short)):
                match = [r for r in pool if r["backbone"] == bb and r["classifier"] == clf and r["geometry"] ==
                         geometry and r["test"] == "wild_test"]
                cells.append(f"{_fmt(match[0]['acc'])} / {_fmt(match[0]['auroc'])}" if match else "n/a")
            lines.append(f"| {bb} | {clf} | " + " | ".join(cells) + " |")
    return lines + [""]


def _logo_section(rows) -> list[str]:
    logo = [r for r in rows if r["experiment"] == "logo"]
    if not logo:
        return []
    lines = ["## Leave one generator out (inside wild train)", "",
             "Trained on wild train without one generator (validation likewise), tested on all of that generator's "
             "images against the wild test photos (unseen sources). FAKE caught = accuracy on the held-out "
             "generator's images.", "",
             "| held-out generator | backbone | best on validation | FAKE caught | REAL passed | ROC-AUC | ECE | "
             "err-det. AUROC |", "|---|---|---|---|---|---|---|---|"]
    for generator in sorted({r["holdout"] for r in logo}):
        for bb in sorted({r["backbone"] for r in logo}):
            best = best_on_validation([r for r in logo if r["holdout"] == generator and r["backbone"] == bb])
            if not best:
                continue
            groups = json.loads(best["groups"])
            caught = groups.get(generator, [math.nan])[0]
            real = [v for g, v in groups.items() if g != generator]
            passed = sum(a * n for a, n in real) / max(1, sum(n for _, n in real))
            lines.append(f"| {generator} | {bb} | {best['classifier']} | {_fmt(caught)} | {_fmt(passed)} | "
                         f"{_fmt(best['auroc'])} | {_fmt(best['ece'])} | {_fmt(best['err_auroc'])} |")
    return lines + [""]


def _crops_section(rows) -> list[str]:
    crops = [r for r in rows if r["experiment"] == "crops"]
    if not crops:
        return []
    main = [r for r in rows if r["experiment"] == "main" and r["train"] == "wild" and r["test"] == "wild_test"
            and r["reduction"] == "none"]
    lines = ["## Five crops at the backbone's input size (wild -> wild test)", "",
             "Features = mean over five S x S crops (centre and corners) of the stored image (up to 512 px), not one "
             "resized thumbnail: the candidate input of a full-size detector.", "",
             f"| backbone | classifier | one centre view: acc / AUC | five crops: {METRIC_HEAD} |",
             "|---|---|---|---|---|---|---|"]
    for r in crops:
        if r["test"] != "wild_test":
            continue
        centre = [m for m in main if m["backbone"] == r["backbone"] and m["classifier"] == r["classifier"]]
        c = f"{_fmt(centre[0]['acc'])} / {_fmt(centre[0]['auroc'])}" if centre else "n/a"
        lines.append(f"| {r['backbone']} | {r['classifier']} | {c} | {metric_cells(r)} |")
    best = best_on_validation([r for r in crops if r["test"] == "wild_test"])
    if best:
        lines += ["", f"Chosen on validation: {best['classifier']} (val acc {_fmt(best['val_acc'])}).", ""]
        lines += _groups_table(best, "Its test accuracy per generator and per source")
    return lines + [""]


def _transform_section(rows, out: Path, written: list) -> list[str]:
    tr = [r for r in rows if r["experiment"] == "transform"]
    if not tr:
        return []
    train_tfs = list(dict.fromkeys(r["train_tf"] for r in tr))
    test_tfs = list(dict.fromkeys(r["test"].split("@")[1] for r in tr))
    lines = ["## Transforms at train time x at test time", "",
             f"Backbone {', '.join(sorted({r['backbone'] for r in tr}))}; per train transform the classifier is "
             "chosen on (equally transformed) validation; cells are test accuracy. Transforms are applied at the "
             "stored resolution (CIFAKE 32 px, wild up to 512 px) before the backbone's resize.", ""]
    targets = sorted({(r["backbone"], r["train"], r["test"].split("@")[0]) for r in tr})
    for backbone, train, target in targets:
        matrix = np.full((len(train_tfs), len(test_tfs)), np.nan)
        chosen = []
        for i, ttf in enumerate(train_tfs):
            pool = [r for r in tr if r["backbone"] == backbone and r["train"] == train and r["train_tf"] == ttf]
            best_none = best_on_validation([r for r in pool if r["test"] == f"{target}@none"])
            if not best_none:
                continue
            chosen.append(best_none["classifier"])
            for j, tf in enumerate(test_tfs):
                match = [r for r in pool if r["classifier"] == best_none["classifier"] and r["test"] ==
                         f"{target}@{tf}"]
                matrix[i, j] = _num(match[0]["acc"]) if match else np.nan
        lines += [f"{backbone}: train {train} -> test {target} (classifier per train transform: {', '.join(chosen)})",
                  "",
                  "| train \\ test | " + " | ".join(test_tfs) + " |", "|---|" + "---|" * len(test_tfs)]
        lines += [f"| {ttf} | " + " | ".join(_fmt(float(v)) for v in matrix[i]) + " |"
                  for i, ttf in enumerate(train_tfs)]
        name = f"heatmap_transforms_{backbone}_train-{train}_test-{target.replace('_test', '')}.png"
        heatmap(matrix, train_tfs, test_tfs, f"{backbone}: train {train} -> test {target}: test accuracy (rows: "
                "train transform)", out / name)
        written.append(str(out / name))
        lines += ["", f"[{name}]({name})", ""]
    return lines
