#!/usr/bin/env bash
# Set up, lint and run the whole test suite (offline, one torch thread per test process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --eval  # lmms-eval too: tests/test_lmms_eval.py runs the plugin through it
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m ruff check src tests benchmarks examples
python3 -m pytest -q -p no:cacheprovider tests
