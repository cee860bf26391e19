#!/usr/bin/env bash
# Reproduce the released CIFAKE detectors end to end: train, calibrate on validation, evaluate on test, export to
# hub_models/NAME (weights, card, report, plots). Usage: bash scripts/release.sh [NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(cifake-mcdropout-cnn cifake-vi-bcnn)
for name in "${names[@]}"; do
    [ -f "runs/$name/final/model.safetensors" ] || python -m train.train "train/configs/$name.yaml" \
        $( [ -f "runs/$name/checkpoint.pt" ] && echo --resume )
    python -m train.evaluate "runs/$name/final" --split test --out "runs/$name/eval_test" \
        --export "hub_models/$name" \
        --command "python -m train.train train/configs/$name.yaml && python -m train.evaluate runs/$name/final --split test --export hub_models/$name   # = bash scripts/release.sh $name"
done
