#!/usr/bin/env bash
# Reproduce the released detectors end to end: train, calibrate on validation, certify the reject rule, fit the
# domain gate, evaluate on test and under laundering / off domain, export to hub_models/NAME (weights, card, report,
# plots, train_history.json). Usage: bash scripts/release.sh [NAME ...]
# One path for every detector (train/README.md):
#   python -m train.train CONFIG     CNNs and fine-tuned backbones: train/configs/NAME.yaml;
#                                    heads on a frozen backbone: train/configs/frozen/NAME.yaml (cached features);
#                                    trained on laundered images: train/configs/robust/NAME.yaml, a fine-tune of
#                                    release 1.0.0 (weights from git, RELEASE_1_REV: the VI CNN, MobileNetV2), of
#                                    a run of another config, trained first (the MC-Dropout CNN's 4.0.0: of 3.0.0's
#                                    run, itself of the base config's), or from scratch (the autoencoder's 2.0.0)
#   python -m train.evaluate runs/NAME/final --split test --alpha 0.01 --domain-gate GATE --stress --export ...
# A finished training (runs/NAME/final) is not repeated; an interrupted one resumes from runs/NAME/checkpoint.
# Releases are immutable: a rerun keeps the folder's version, and the export refuses it if the outputs changed; a
# detector meant to change needs a new one, RELEASE_VERSION=2.2.0 (and RELEASE_NOTES="what changed") in the
# environment pass --version / --notes to train.evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
RELEASE_1_REV=${RELEASE_1_REV:-e363db6}  # the commit that holds every release at 1.0.0
LITE0=../shared/weights/tf_efficientnet_lite0.in1k.safetensors
# A key of a training config as written (out_dir defaults to runs/NAME); read without building the config, whose
# init_from must already exist.
config_value() {
    python -c "import sys, yaml; c = yaml.safe_load(open(sys.argv[1]))
print(c.get(sys.argv[2]) or ('runs/' + c['name'] if sys.argv[2] == 'out_dir' else ''))" "$1" "$2"
}
# Train CONFIG into its run folder RUN unless RUN/final is there; an interrupted run resumes from its checkpoint.
train_once() {
    [ -f "$2/final/train_history.json" ] || python -m train.train "$1" \
        $( [ -d "$2/checkpoint" ] || [ -d "$2/checkpoint.old" ] && echo --resume )
}
# The config under train/configs whose run folder is $1 (what an init_from RUN/final was trained by).
config_for_run() {
    local found=() file
    for file in $(find train/configs -name '*.yaml' | sort); do
        [ "$(config_value "$file" out_dir 2>/dev/null)" = "$1" ] && found+=("$file")
    done
    [ ${#found[@]} -eq 1 ] || { echo "${#found[@]} configs under train/configs write $1 (need exactly one): ${found[*]}" >&2
                                return 1; }
    echo "${found[0]}"
}
# Make what CONFIG fine-tunes (init_from) exist first: release 1.0.0 exactly as git holds it (the VI CNN's and
# MobileNetV2's 2.x fine-tune it), or a run of this repository, trained (after its own parents) by the one config that
# writes it (the MC-Dropout CNN: base config -> 3.0.0's laundering fine-tune -> 4.0.0's second cycle).
train_parents() {
    local init parent
    init=$(config_value "$1" init_from)
    case "$init" in
        runs/release-1.0.0/*) [ -d runs/release-1.0.0/hub_models ] || { mkdir -p runs/release-1.0.0 &&
            git archive "$RELEASE_1_REV" hub_models | tar -x -C runs/release-1.0.0; } ;;
        */final) parent=$(config_for_run "${init%/final}")
                 train_parents "$parent"
                 train_once "$parent" "${init%/final}" ;;
    esac
}
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(cifake-mcdropout-cnn cifake-vi-bcnn cifake-mobilenetv2-ft effnetlite0-linear
                                 effnetlite0-gnb effnetlite0-mcd-mlp effnetlite0-mcd-deep effnetlite0-vi-linear
                                 wild-effnetlite2-multiview wild-effnetlite0-multiview)
for name in "${names[@]}"; do
    # The full-size detector (issue 14): a multi-view head on frozen EfficientNet-Lite2 features of wild, in one
    # command (train.fullsize: features, validation split, head, gate, certification at alpha 0.10, test, export).
    if [ -f "train/configs/fullsize/$name.yaml" ]; then
        python -m train.fullsize "train/configs/fullsize/$name.yaml" --out "runs/$name" --export "hub_models/$name" \
            --version "${RELEASE_VERSION:-$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['release_version'])" \
                "hub_models/$name/config.json" 2>/dev/null || echo 1.0.0)}"
        continue
    fi
    extend=()
    if [ -f "train/configs/robust/$name.yaml" ]; then
        # Trained on laundered images: the CNNs' 2.x (3.0.0 and 4.0.0 for the MC-Dropout CNN), the autoencoder's 2.0.0.
        config="train/configs/robust/$name.yaml"
        train_parents "$config"
    elif [ -f "train/configs/autoencoder/$name-64px.yaml" ]; then
        # The autoencoder detector's 1.0.0 as trained on one CPU thread: 64 px, a 57,600-image subset, one epoch,
        # then a warm-restart second epoch over it (extend).
        config="train/configs/autoencoder/$name-64px.yaml"
        extend=(epochs=2 "lr_cycles=[1, 1]" lr_cycle_decay=0.5)
    else
        config="train/configs/$name.yaml"
        [ -f "$config" ] || config="train/configs/frozen/$name.yaml"
    fi
    [ -f "$config" ] || { echo "no config for $name (train/configs/[robust/|frozen/]$name.yaml)" >&2; exit 1; }
    run=$(config_value "$config" out_dir)
    # The domain gate: a head on frozen EfficientNet-Lite0 features reads those features; the others ship a frozen
    # Lite0 of their own (their own features do not tell CIFAKE from other images: benchmarks/results_domain.md).
    case "$name" in
        effnetlite0-*) gate=(--domain-gate features) ;;
        *) gate=(--domain-gate tf_efficientnet_lite0 --domain-weights "$LITE0") ;;
    esac
    # The MC-Dropout CNN is released in int8 from 2.1.0 on (issue 17: >= 3,000 images/s at T=30 on 2 cores): its
    # activation ranges are calibrated on 1,024 training images, and everything after is measured in int8.
    case "$name" in
        cifake-mcdropout-cnn) int8=(--int8-calibration 1024) ;;
        *) int8=() ;;
    esac
    # The reject rule of the two detectors whose threshold sits far from 0.5 reads the verdict entropy (P(FAKE)
    # re-centred on the threshold) from CNN 3.1.0 / autoencoder 2.2.0 on; the others keep the predictive entropy
    # their releases were certified on.
    case "$name" in
        cifake-mcdropout-cnn|cifake-ae-mobilenetv2) reject=(--reject-score verdict_entropy) ;;
        *) reject=() ;;
    esac
    # The autoencoder's reconstruction_error is the definition that tells wild train from CIFAKE validation best on
    # the trained detector (choose_recon).
    case "$name" in
        cifake-ae-mobilenetv2) choose_recon=1 ;;
        *) choose_recon= ;;
    esac
    # What the card says beyond the measured tables (e.g. the targets a release misses), kept with the repository.
    notes=${RELEASE_NOTES:-$(cat "train/results/release-notes/$name.md" 2>/dev/null || true)}
    # Reproducing a release keeps its version (export refuses it if the outputs changed); RELEASE_VERSION overrides.
    version=${RELEASE_VERSION:-$(python -c "import json, sys; print(json.load(open(sys.argv[1])).get('release_version')
        or '')" "hub_models/$name/config.json" 2>/dev/null || true)}
    train_once "$config" "$run"
    # A run trained in two steps: the second (a warm-restart cycle) resumes from the first one's checkpoint.
    if [ ${#extend[@]} -gt 0 ] && [ "$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['train_config']
        ['epochs'])" "$run/final/train_history.json")" != "${extend[0]#epochs=}" ]; then
        python -m train.train "$config" --resume --set "${extend[@]}"
    fi
    recon=()
    if [ -n "$choose_recon" ]; then
        # (measured again whenever the training is newer than the measurement)
        [ "$run/error_definitions.json" -nt "$run/final/train_history.json" ] ||
            python benchmarks/bench_ae_error_definitions.py "$run/final" \
            --output "$run/error_definitions.json"
        recon=(--reconstruction-metric "$(python -c "import json, sys; print(json.load(open(sys.argv[1]))[
            'chosen (on wild train vs CIFAKE val)'])" "$run/error_definitions.json")")
    fi
    python -m train.evaluate "$run/final" --split test --out "$run/eval_test" --alpha 0.01 --delta 0.1 \
        "${gate[@]}" "${int8[@]}" "${recon[@]}" "${reject[@]}" --training-data cifake --stress \
        --export "hub_models/$name" ${version:+--version "$version"} \
        ${notes:+--notes "$notes"} --command "bash scripts/release.sh $name"
done
