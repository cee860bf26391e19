"""Turn a trained detector into a complete Hugging Face Hub repo folder, and publish it.

    python -m hub_models.export MODEL_DIR OUT_DIR [--report eval/report.json] [--plots a.png ...]
        [--command "the command that reproduced it"] [--version 1.2.0] [--repo-id bayesfake/NAME] [--push]

MODEL_DIR is a folder written by ``save_pretrained`` (training writes ``final/``). The folder gets ``config.json`` (with
``auto_map`` for AutoConfig, AutoModel and AutoModelForImageClassification), the weights, the configuration, modeling
and image-processing code of this package, ``preprocessor_config.json``, ``golden_outputs.json`` (``hub_models.golden``),
the evaluation report and plots, and a model card ``README.md`` with YAML metadata and the measured metrics.

One source for the code: a folder exported into this package's own directory (a bundled release, ``hub_models/NAME``)
gets the code files as relative symlinks to ``hub_models/*.py``, so git holds the model code once and the folder still
loads with ``trust_remote_code=True`` (transformers copies the files it finds there, following the links). Anywhere
else, and for the Hub (``write_hub_folder``, ``publish``), they are real files: a pushed repo is self-contained.

Weights: a detector on a timm backbone is stored as two shards, ``model-backbone.safetensors`` and
``model-head.safetensors``, with ``model.safetensors.index.json``; the releases that share a frozen backbone then hold
byte-identical backbone shards, one blob in git. The from-scratch CNNs keep one ``model.safetensors``.

Releases are immutable: exporting over a folder whose golden outputs differ from the new ones is refused unless the
version changes (``--version``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from safetensors.torch import save_file

from .configuration_bayesfake import REJECT_SCORE_WORDS, SCRATCH_CNN, BayesFakeConfig
from .golden import GOLDEN_FILE, GOLDEN_NUM_IMAGES, GOLDEN_NUM_SAMPLES, GOLDEN_SEED, compute_golden, differences
from .hub import CODE_FILES, HUB_MODELS_DIR, HUB_ORG, WEIGHTS_FILE, WEIGHTS_INDEX, check_repo_folder
from .image_processing_bayesfake import BayesFakeImageProcessor

# First matching prefix wins. The domain gate's frozen extractor and its statistics get shards of their own, so
# releases that ship the same ones hold byte-identical files (one blob in git), as releases sharing a frozen backbone
# do: the statistics of a 1280-d gate are 13 MB, the same for every release fitted on the same features.
SHARDS = {"backbone.": "model-backbone.safetensors", "domain_gate.extractor.": "model-domain-extractor.safetensors",
          "domain_gate.": "model-domain.safetensors", "": "model-head.safetensors"}


class ReleaseChangedError(ValueError):
    """Exporting would change a released detector's outputs under the same version."""

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
                    command: str = "", repo_id: str | None = None, version: str | None = None,
                    notes: str = "") -> Path:
    """Write a complete Hub repo folder for ``model`` (a ``BayesFakeDetector``) and return its path.

    ``report`` is the evaluation report (``train.evaluate``): its ``metrics`` go into the config and the card.
    ``version`` sets ``config.release_version``; ``notes`` (plain words: what changed) go into the card's release
    section. Raises ``ReleaseChangedError`` (writing nothing) when ``out_dir``
    holds golden outputs of the same version that the model no longer gives.
    """
    out = Path(out_dir)
    repo_id = repo_id or f"{HUB_ORG}/{out.name}"
    config: BayesFakeConfig = model.config
    if version is not None:
        config.release_version = version
    config.validate_bayesfake()  # fields may have been set after construction (a version, a fitted threshold)
    golden = compute_golden(model)
    check_release_unchanged(out, golden)
    out.mkdir(parents=True, exist_ok=True)
    for name in CODE_FILES:  # save_pretrained copies the code in: it must not write through a link into the source
        (out / name).unlink(missing_ok=True)
    if report is not None:
        config.metrics = {k: v for k, v in report["metrics"].items() if isinstance(v, (int, float))}
    model.save_pretrained(out)
    if config.backbone != SCRATCH_CNN or getattr(model, "domain_gate", None) is not None:
        shard_weights(out)
    else:  # a previous sharded export in the same folder must not shadow the new single file
        for stale in (WEIGHTS_INDEX, *SHARDS.values()):
            (out / stale).unlink(missing_ok=True)
    # save_pretrained records only the last auto class registered; write every entry so both loaders work.
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    saved["auto_map"] = AUTO_MAP
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    BayesFakeImageProcessor.from_config(config).save_pretrained(out)
    write_code_files(out)  # after save_pretrained, which may copy code files of its own
    for plot in plots:
        if Path(plot).resolve() != (out / Path(plot).name).resolve():
            shutil.copyfile(plot, out / Path(plot).name)
    if report is not None:
        (out / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / GOLDEN_FILE).write_text(json.dumps(golden, indent=1) + "\n")
    model_card(config, report, [Path(p).name for p in plots], command, repo_id, notes).save(out / "README.md")
    return check_repo_folder(out)


def check_release_unchanged(out: Path, golden: dict) -> None:
    """Refuse to overwrite the golden outputs of a version with different ones."""
    path = out / GOLDEN_FILE
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    if previous.get("release_version") != golden["release_version"]:
        return
    found = differences(previous, golden)
    if found:
        raise ReleaseChangedError(
            f"{out}: version {golden['release_version']!r} was released with other outputs ({'; '.join(found)}); "
            "a changed detector needs a new version (--version)")


def shard_weights(folder: Path) -> None:
    """Replace ``model.safetensors`` by one shard per ``SHARDS`` prefix that has tensors, and the index transformers
    loads them by."""
    from safetensors.torch import load_file

    tensors = load_file(folder / WEIGHTS_FILE)
    shards: dict[str, dict] = {name: {} for name in SHARDS.values()}
    weight_map = {}
    for key, tensor in tensors.items():
        name = next(shard for prefix, shard in SHARDS.items() if key.startswith(prefix))
        shards[name][key] = tensor.contiguous()
        weight_map[key] = name
    total = 0
    for name, part in shards.items():
        (folder / name).unlink(missing_ok=True)  # a shard of an earlier export that this model no longer has
        if part:
            save_file(part, folder / name, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (folder / WEIGHTS_FILE).unlink()


def write_code_files(out: Path) -> None:
    """The model code of this package in ``out``: relative symlinks inside ``hub_models/``, real files elsewhere."""
    linked = out.resolve().parent == HUB_MODELS_DIR
    for name in CODE_FILES:
        target = out / name
        target.unlink(missing_ok=True)
        if linked:
            target.symlink_to(Path("..") / name)
        else:
            shutil.copyfile(HUB_MODELS_DIR / name, target)


def write_hub_folder(folder: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A self-contained copy of a detector folder (links resolved into real files), ready to push or ship."""
    folder = check_repo_folder(folder)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    shutil.copytree(folder, out, symlinks=False, dirs_exist_ok=True)
    return check_repo_folder(out)


def answer_rules(config: BayesFakeConfig) -> str:
    """Plain words on when the detector answers: its domain gate and its certified reject rule."""
    parts = []
    if config.domain_gate:
        reads = ("its own backbone features" if config.domain_gate == "features" else
                 f"the features of a frozen ImageNet `{config.domain_gate}` shipped in this repo "
                 f"({config.domain_image_size} px): one small extra backbone pass per image")
        parts.append(
            f"**Outside its domain it gives no verdict.** Data it learned from: {', '.join(config.training_data) or 'n/a'}. "
            f"A domain gate measures how unlike that data an image is (`domain_score`: the Mahalanobis distance of "
            f"{reads} to one Gaussian per class fitted on the training images); above {config.domain_threshold:.4g} "
            "(a threshold that at least 99% of in-domain validation images stay under) `in_domain` is False and the "
            "verdict is \"outside what this detector was trained on: no verdict\"."
            + (" Real photos, other generators and full-size pictures are outside a CIFAKE detector's domain: it cannot "
               "judge them." if "cifake" in config.training_data or not config.training_data else ""))
    record = config.abstention
    if record:
        if record.get("certified"):
            parts.append(
                f"**It answers only when it can keep its error rate low.** The reject rule (answer when the "
                f"{REJECT_SCORE_WORDS[config.reject_score]} is at most {config.reject_entropy:.4g} nats) was certified on "
                f"{record['calibration_n']} in-domain validation images not used for anything else ({record['method']}): "
                f"with probability at least {1 - record['delta']:.0%}, at most {record['alpha']:.1%} of the in-domain "
                f"images it answers are wrong. It answered {record['coverage']:.1%} of them; the others get "
                "\"uncertain: needs human review\".")
        else:
            parts.append(
                f"**No reject rule could be certified** at an error rate of {record['alpha']:.1%} (probability "
                f"{1 - record['delta']:.0%}) on {record['calibration_n']} validation images: this detector is too weak "
                "to answer on its own, so every in-domain image gets \"uncertain: needs human review\"; its "
                "probabilities are still reported.")
    return ("\n" + "\n\n".join(parts) + "\n") if parts else ""


def stress_section(report: dict | None) -> str:
    """The laundered and off-domain table of the evaluation report, when it has one."""
    if not report or not report.get("stress"):
        return ""
    rows = []
    for name, m in report["stress"].items():
        def pct(key):
            v = m.get(key)
            return "n/a" if v is None or v != v else f"{100 * v:.1f}%"

        auroc = m.get("ood/auroc")
        rows.append(f"| {name} | {m['meta/n']} | {pct('cls/acc')} | {pct('sc/coverage')} | {pct('sc/answered_acc')} | "
                    f"{pct('ood/outside_share')} | {pct('sc/review_share')} | "
                    f"{'n/a' if auroc is None else f'{auroc:.3f}'} |")
    return ("\n## Laundered and off-domain images\n\nThe test images laundered as people do (JPEG, a downscale by 2 "
            "and back, a 75% centre crop, blur; a seeded subset), and `wild` (real photos and images of 12 generators "
            "at upload sizes, none like the training data). \"answered\" is the share given a verdict; "
            "\"outside\" the share the domain gate refused; \"uncertain\" the share sent to review; the domain AUROC "
            "says how well `domain_score` tells the set from the clean test images.\n\n"
            "| set | images | accuracy (all) | answered | accuracy (answered) | outside | uncertain | domain AUROC |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def model_card(config: BayesFakeConfig, report: dict | None, plot_names: list[str], command: str,
               repo_id: str, notes: str = "") -> ModelCard:
    metrics = (report or {}).get("metrics", {})
    split = (report or {}).get("split", "test")
    dataset = (report or {}).get("dataset", "CIFAKE")
    eval_results = [
        EvalResult(task_type="image-classification", dataset_type=dataset.lower(), dataset_name=dataset,
                   dataset_split=split,
                   metric_type=kind, metric_name=name, metric_value=float(metrics[key]))
        # A metric that could not be measured (None/NaN in the report) is left out of the card, never claimed.
        for key, kind, name in CARD_METRICS if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key])
    ]
    data = ModelCardData(
        license="mit",
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["ai-generated-image-detection", "uncertainty", "bayesian", config.head, "custom_code"],
        datasets=config.training_data or ["cifake"],
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
    views = getattr(config, "num_views", 1)
    input_text = (f"{config.image_size}x{config.image_size}\nRGB (any image is converted, EXIF-rotated, resized on its "
                  "shorter side and center-cropped by the bundled image processor)") if views == 1 else (
        f"{views} views of {config.image_size}x{config.image_size} RGB per image (`{config.view_layout}`), cut by the "
        f"bundled image processor from a copy at most {config.view_max_side} px on its longer side (any image is "
        "converted and EXIF-rotated; a large JPEG is decoded at a reduced scale first); the frozen backbone runs once "
        "per view and the head, sampled T times, reads the mean of the views' features")
    body = f"""
# {repo_id}

A detector of AI-generated images that says how sure it is: `{config.backbone}` backbone with a {head}, sampled
T={config.num_samples} times per image. It returns P(FAKE), its standard deviation over the samples, and the
predictive entropy split into epistemic (mutual information) and aleatoric (expected entropy) parts.

**Training domain**: {config.training_domain or "see the training report"}. Input: {input_text}.
Decision threshold on P(FAKE): {config.threshold:.4f}; temperature: {config.calibration_temperature:.4f};
{"no reject rule (see below)" if config.reject_entropy is None else
 f"reject when the {REJECT_SCORE_WORDS[config.reject_score]} > {config.reject_entropy:.4g} nats"}.
{answer_rules(config)}
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
{stress_section(report)}
{plots}

## Release

Version: {config.release_version or "unreleased"}. `{GOLDEN_FILE}` holds what this version answers on {GOLDEN_NUM_IMAGES}
seeded inputs (`hub_models.golden`, T={GOLDEN_NUM_SAMPLES}, seed {GOLDEN_SEED}): the project's tests recompute it, so its
outputs change only with a new version. {notes}

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
    with tempfile.TemporaryDirectory() as tmp:
        hub_ready = write_hub_folder(folder, Path(tmp) / folder.name)  # links become files: the repo stands alone
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(hub_ready), repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message)
    return info.oid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="folder written by save_pretrained (training's final/)")
    parser.add_argument("out_dir", help="Hub repo folder to write")
    parser.add_argument("--report", help="evaluation report JSON (train.evaluate)")
    parser.add_argument("--plots", nargs="*", default=[], help="PNG plots to include and show in the card")
    parser.add_argument("--command", default="", help="the command that reproduces the model")
    parser.add_argument("--version", help="release version MAJOR.MINOR.PATCH (needed when the outputs change)")
    parser.add_argument("--notes", default="", help="what this version changed, in plain words (the card's release notes)")
    parser.add_argument("--repo-id", help=f"Hub repo id (default {HUB_ORG}/OUT_DIR_NAME)")
    parser.add_argument("--push", action="store_true", help="create the Hub repo and upload the folder")
    args = parser.parse_args(argv)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(args.model_dir, trust_remote_code=True)
    # Weights in memory, not memory-mapped from MODEL_DIR: re-exporting a release over its own folder rewrites them.
    model.load_state_dict({key: value.clone() for key, value in model.state_dict().items()})
    report = json.loads(Path(args.report).read_text()) if args.report else None
    out = export_detector(model, args.out_dir, report, args.plots, args.command, args.repo_id, args.version,
                          args.notes)
    print(f"wrote {out}")
    if args.push:
        repo_id = args.repo_id or f"{HUB_ORG}/{out.name}"
        print(f"pushed {repo_id} at revision {publish(out, repo_id)}")


if __name__ == "__main__":
    main()
