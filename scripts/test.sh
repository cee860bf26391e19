#!/usr/bin/env bash
# Fresh machine -> installed project -> full test suite. The README's test command and .ci/run both run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
# The page tests drive Debian's chromium with Playwright (a browser download is impossible offline).
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
python -m pytest -q "$@"
