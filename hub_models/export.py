"""Turn a trained detector into a complete Hugging Face Hub repo folder, and publish it.

    python -m hub_models.export MODEL_DIR OUT_DIR [--report eval/report.json] [--plots a.png ...]
        [--command "the command that reproduced it"] [--repo-id bayesfake/NAME] [--push]

MODEL_DIR is a folder written by ``save_pretrained`` (training writes ``final/``). The folder gets ``config.json`` (with
``auto_map`` for AutoConfig, AutoModel and AutoModelForImageClassification), ``model.safetensors``, the configuration,
modeling and image-processing files copied from this package (the one source of truth), ``preprocessor_config.json``,
the evaluation report and plots, and a model card ``README.md`` with YAML metadata and the measured metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .configuration_bayesfake import BayesFakeConfig
from .hub import CODE_FILES, HUB_MODELS_DIR, HUB_ORG, check_repo_folder
from .image_processing_bayesfake import BayesFakeImageProcessor

AUTO_MAP = {
    "AutoConfig": "configuration_bayesfake.BayesFakeConfig",
    "AutoModel": "modeling_bayesfake.BayesFakeDetector",
    "AutoModelForImageClassification": "modeling_bayesfake.BayesFakeDetector",
}
# Metrics put in the card's model-index: (report key, model-index metric type, display name).
CARD_METRICS = (
    ("cls/acc", "accuracy", "Accuracy"),
    ("cls/f1", "f1", "F1"),
    ("cls/auroc", "roc_auc", "ROC-AUC"),
    ("cal/ece", "ece", "ECE (15 bins)"),
    ("cal/nll", "nll", "NLL"),
    ("cal/brier", "brier", "Brier score"),
    ("sc/aurc", "aurc", "AURC"),
    ("sc/auroc_entropy", "error_detection_auroc", "Error-detection AUROC (predictive entropy)"),
)


def export_detector(model, out_dir: str | Path, report: dict | None = None, plots: list[str | Path] = (),
                    command: str = "", repo_id: str | None = None) -> Path:
    """Write a complete Hub repo folder for ``model`` (a ``BayesFakeDetector``) and return its path.

    ``report`` is the evaluation report (``train.evaluate``): its ``metrics`` go into the config and the card.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    repo_id = repo_id or f"{HUB_ORG}/{out.name}"
    config: BayesFakeConfig = model.config
    if report is not None:
        config.metrics = {k: v for k, v in report["metrics"].items() if isinstance(v, (int, float))}
    model.save_pretrained(out)
    # save_pretrained records only the last auto class registered; write every entry so both loaders work.
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    saved["auto_map"] = AUTO_MAP
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    for name in CODE_FILES:
        shutil.copyfile(HUB_MODELS_DIR / name, out / name)
    BayesFakeImageProcessor.from_config(config).save_pretrained(out)
    for name in CODE_FILES:  # save_pretrained may have copied code files; keep the package's bytes exactly
        shutil.copyfile(HUB_MODELS_DIR / name, out / name)
    for plot in plots:
        shutil.copyfile(plot, out / Path(plot).name)
    if report is not None:
        (out / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
    model_card(config, report, [Path(p).name for p in plots], command, repo_id).save(out / "README.md")
    return check_repo_folder(out)


def model_card(config: BayesFakeConfig, report: dict | None, plot_names: list[str], command: str,
               repo_id: str) -> ModelCard:
    metrics = (report or {}).get("metrics", {})
    split = (report or {}).get("split", "test")
    dataset = (report or {}).get("dataset", "CIFAKE")
    eval_results = [
        EvalResult(task_type="image-classification", dataset_type="cifake", dataset_name=dataset, dataset_split=split,
                   metric_type=kind, metric_name=name, metric_value=float(metrics[key]))
        # A metric that could not be measured (None/NaN in the report) is left out of the card, never claimed.
        for key, kind, name in CARD_METRICS if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key])
    ]
    data = ModelCardData(
        license="mit",
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["ai-generated-image-detection", "uncertainty", "bayesian", config.head, "custom_code"],
        datasets=["cifake"],
        model_name=repo_id,
        eval_results=eval_results or None,
    )
    head = {"mc_dropout": f"MC-Dropout head (p={config.dropout})",
            "variational": f"variational ({config.variational_layer}, scope={config.variational_scope}, "
                           f"prior N({config.prior_mu}, {config.prior_sigma}^2))",
            "deterministic": "deterministic head",
            "gaussian_nb": "Gaussian Naive Bayes head (closed form, deterministic)"}[config.head]
    table = "\n".join(f"| `{k}` | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    plots = "\n".join(f"![{name}]({name})" for name in plot_names)
    body = f"""
# {repo_id}

A detector of AI-generated images that says how sure it is: `{config.backbone}` backbone with a {head}, sampled
T={config.num_samples} times per image. It returns P(FAKE), its standard deviation over the samples, and the
predictive entropy split into epistemic (mutual information) and aleatoric (expected entropy) parts.

**Training domain**: {config.training_domain or "see the training report"}. Input: {config.image_size}x{config.image_size}
RGB (any image is converted, EXIF-rotated, resized on its shorter side and center-cropped by the bundled image processor).
Decision threshold on P(FAKE): {config.threshold:.4f}; temperature: {config.calibration_temperature:.4f};
reject when predictive entropy > {config.reject_entropy} nats.

## Use

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

repo = "{repo_id}"
revision = "main"  # pin a commit hash here for reproducible results
model = AutoModel.from_pretrained(repo, trust_remote_code=True, revision=revision).eval()
processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True, revision=revision)
inputs = processor(Image.open("photo.jpg"), return_tensors="pt")
with torch.no_grad():
    out = model(inputs["pixel_values"], num_samples={config.num_samples}, seed=0)
print(out.probs[:, 1], out.std[:, 1], out.mutual_information, model.verdicts(out))
why = model.explain(inputs["pixel_values"])  # saliency map [B, H, W] and feature importance [B, D] of P(FAKE)
```

`pipeline("image-classification", model=repo, trust_remote_code=True)` returns the REAL/FAKE scores too.

## Evaluation ({dataset}, split `{split}`)

| metric | value |
|---|---|
{table or "| (not evaluated) | |"}

{plots}

## Reproduce

```bash
{command or "(no command recorded)"}
```

## Intended use and limits

Screening aid for journalism, forensics and moderation: a high-uncertainty verdict means "ask a human", not "real".
Trained only on {config.training_domain or "its training data"}; images from other generators, other resolutions or
heavy post-processing are out of domain, and the reported numbers do not transfer to them. Never use the verdict
alone to accuse anyone.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def publish(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False,
            commit_message: str = "Upload BayesFake detector") -> str:
    """Create the Hub repo and upload the folder; return the commit hash to pin as ``revision``."""
    folder = check_repo_folder(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message)
    return info.oid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="folder written by save_pretrained (training's final/)")
    parser.add_argument("out_dir", help="Hub repo folder to write")
    parser.add_argument("--report", help="evaluation report JSON (train.evaluate)")
    parser.add_argument("--plots", nargs="*", default=[], help="PNG plots to include and show in the card")
    parser.add_argument("--command", default="", help="the command that reproduces the model")
    parser.add_argument("--repo-id", help=f"Hub repo id (default {HUB_ORG}/OUT_DIR_NAME)")
    parser.add_argument("--push", action="store_true", help="create the Hub repo and upload the folder")
    args = parser.parse_args(argv)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(args.model_dir, trust_remote_code=True)
    report = json.loads(Path(args.report).read_text()) if args.report else None
    out = export_detector(model, args.out_dir, report, args.plots, args.command, args.repo_id)
    print(f"wrote {out}")
    if args.push:
        repo_id = args.repo_id or f"{HUB_ORG}/{out.name}"
        print(f"pushed {repo_id} at revision {publish(out, repo_id)}")


if __name__ == "__main__":
    main()
