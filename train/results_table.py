"""The measured results of every released detector, as the Markdown table the README carries.

    python -m train.results_table            # reads hub_models/NAME/eval_report.json and train_history.json

Numbers come from each folder's own report (written by train.evaluate / train.frozen), never typed by hand.
"""

from __future__ import annotations

import json

from hub_models.hub import HUB_MODELS_DIR, RELEASED

COLUMNS = ("detector", "head", "T", "acc", "ROC-AUC", "ECE", "NLL", "AURC", "error-det. AUROC (entropy / std / MI)",
           "acc @10% rejected", "temperature")


def row(name: str) -> list[str]:
    folder = HUB_MODELS_DIR / name
    report = json.loads((folder / "eval_report.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    m = report["metrics"]
    auroc = " / ".join(f"{m[f'sc/auroc_{k}']:.3f}" for k in ("entropy", "std", "mi"))
    return [f"`{name}`", config["head"], str(m["meta/num_samples"]), f"{m['cls/acc']:.4f}", f"{m['cls/auroc']:.4f}",
            f"{m['cal/ece']:.4f}", f"{m['cal/nll']:.3f}", f"{m['sc/aurc']:.4f}", auroc, f"{m['sc/acc@reject10']:.3f}",
            f"{config['calibration_temperature']:.2f}"]


def table(names=RELEASED) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(name)) + " |" for name in names]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
