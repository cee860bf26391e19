#!/usr/bin/env bash
# Fresh machine -> installed project -> the Space serving the bundled detectors on http://127.0.0.1:7860
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e .
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
exec python space/app.py "$@"
