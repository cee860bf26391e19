#!/usr/bin/env bash
# Reproduce the released detectors end to end: train, calibrate on validation, evaluate on test, export to
# hub_models/NAME (weights, card, report, plots, train_history.json). Usage: bash scripts/release.sh [NAME ...]
# One path for every detector (train/README.md):
#   python -m train.train CONFIG     CNNs and fine-tuned backbones: train/configs/NAME.yaml;
#                                    heads on a frozen backbone: train/configs/frozen/NAME.yaml (cached features)
#   python -m train.evaluate runs/NAME/final --split test --export hub_models/NAME
# A finished training (runs/NAME/final) is not repeated; an interrupted one resumes from runs/NAME/checkpoint.
# Releases are immutable: a detector whose outputs changed needs a new version, RELEASE_VERSION=1.1.0 (and
# RELEASE_NOTES="what changed") in the environment pass --version / --notes to train.evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(cifake-mcdropout-cnn cifake-vi-bcnn cifake-mobilenetv2-ft effnetlite0-linear
                                 effnetlite0-gnb effnetlite0-mcd-mlp effnetlite0-mcd-deep effnetlite0-vi-linear)
for name in "${names[@]}"; do
    config="train/configs/$name.yaml"
    [ -f "$config" ] || config="train/configs/frozen/$name.yaml"
    [ -f "$config" ] || { echo "no config for $name (train/configs/[frozen/]$name.yaml)" >&2; exit 1; }
    [ -f "runs/$name/final/train_history.json" ] || python -m train.train "$config" \
        $( [ -d "runs/$name/checkpoint" ] || [ -d "runs/$name/checkpoint.old" ] && echo --resume )
    python -m train.evaluate "runs/$name/final" --split test --out "runs/$name/eval_test" \
        --export "hub_models/$name" ${RELEASE_VERSION:+--version "$RELEASE_VERSION"} \
        ${RELEASE_NOTES:+--notes "$RELEASE_NOTES"} \
        --command "python -m train.train $config && python -m train.evaluate runs/$name/final --split test --export hub_models/$name   # = bash scripts/release.sh $name"
done
