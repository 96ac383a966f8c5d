#!/usr/bin/env bash
# Install visor_hf and its dependencies. The CPU build of torch is installed first, so that the package's
# `torch>=2.4` requirement is already met and pip does not fetch a multi-GB CUDA build.
# `--eval` also installs lmms-eval for `python -m lmms_eval --model visor`: the `[eval]` extra brings the packages
# lmms-eval's core needs, then lmms-eval itself goes in without its own requirements (they pull CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="test,bench,train"
if [[ "${1:-}" == "--eval" ]]; then extras="$extras,eval"; fi
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
if [[ "${1:-}" == "--eval" ]]; then
    python3 -m pip install --quiet --disable-pip-version-check --no-deps "lmms-eval==0.7.3"
fi
