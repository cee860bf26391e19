#!/usr/bin/env bash
# Reproduce the released detectors end to end: train, calibrate on validation, evaluate on test, export to
# hub_models/NAME (weights, card, report, plots). Usage: bash scripts/release.sh [NAME ...]
#   CNNs and fine-tuned backbones: train/configs/NAME.yaml (train.train, then train.evaluate)
#   heads on a frozen backbone:    train/configs/frozen/NAME.yaml (train.frozen: cached features, head, report, export)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(cifake-mcdropout-cnn cifake-vi-bcnn cifake-mobilenetv2-ft effnetlite0-linear
                                 effnetlite0-gnb effnetlite0-mcd-mlp effnetlite0-mcd-deep effnetlite0-vi-linear)
for name in "${names[@]}"; do
    if [ -f "train/configs/frozen/$name.yaml" ]; then
        python -m train.frozen "train/configs/frozen/$name.yaml" --split test --export "hub_models/$name"
        continue
    fi
    [ -f "runs/$name/final/model.safetensors" ] || python -m train.train "train/configs/$name.yaml" \
        $( [ -f "runs/$name/checkpoint.pt" ] && echo --resume )
    python -m train.evaluate "runs/$name/final" --split test --out "runs/$name/eval_test" \
        --export "hub_models/$name" \
        --command "python -m train.train train/configs/$name.yaml && python -m train.evaluate runs/$name/final --split test --export hub_models/$name   # = bash scripts/release.sh $name"
    cp "runs/$name/history.json" "hub_models/$name/train_history.json"   # the training record ships with the weights
done
