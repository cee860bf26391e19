"""The evaluation report: ``report.json`` (NaN written as null), ``report.md`` and the plots, in one folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from train.plots import write_plots
from train.prediction import Predictions

NAMESPACE_TITLES = {
    "cls": "Classification (at the decision threshold)",
    "cal": "Calibration of the predictive probabilities",
    "sc": "Uncertainty and selective classification (errors at the decision threshold)",
    "meta": "Run",
}


def json_safe(value):
    """NaN -> None (JSON has no NaN; export then leaves undefined metrics out), recursively; numpy -> Python."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: dict, header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{key}` | {format_value(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    metrics = report["metrics"]
    parts = [
        f"# Evaluation report: {report['name']}",
        f"Dataset {report['dataset']}, split `{report['split']}`: {metrics['meta/n']} images, "
        f"T = {metrics['meta/num_samples']} Monte Carlo samples, decision threshold on P(FAKE) = "
        f"{metrics['meta/threshold']:.4f}.",
        "## Thresholds on P(FAKE) (chosen on validation)",
        markdown_table(report["thresholds"], ("rule", "threshold")),
    ]
    for namespace, title in NAMESPACE_TITLES.items():
        rows = {k: v for k, v in metrics.items() if k.split("/")[0] == namespace}
        if rows:
            parts += [f"## {title}", markdown_table(rows, ("metric", "value"))]
    described = {"name", "dataset", "split", "thresholds", "metrics", "plots", "stress"}
    if report.get("stress"):
        from train.offdomain import stress_markdown

        parts += ["## Laundered and off-domain images", stress_markdown(report["stress"])]
    for key, value in report.items():
        if key not in described:
            parts += [f"## {key}", markdown_table(value, ("key", "value")) if isinstance(value, dict)
                      else format_value(value)]
    parts += ["## Plots", *(f"![{Path(p).stem}]({p})" for p in report["plots"])]
    return "\n\n".join(parts) + "\n"


def write_report(metrics: dict, preds: Predictions, out_dir: str | Path, name: str, extra: dict | None = None,
                 features: np.ndarray | None = None) -> dict:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out_dir``; return the report dict.

    The report holds ``name``, ``dataset``, ``split``, ``thresholds`` (defaults: CIFAKE, test, the metrics' threshold;
    ``extra`` overrides them and adds keys), ``metrics`` (NaN written as null) and ``plots`` (file names in out_dir).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "name": name,
        "dataset": "CIFAKE",
        "split": "test",
        "thresholds": {"chosen": metrics["meta/threshold"]},
        **(extra or {}),
        "metrics": metrics,
    }
    report["plots"] = write_plots(metrics, preds, out, features, pca_title=f"{name}: {report['split']} features")
    report = json_safe(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    return report

