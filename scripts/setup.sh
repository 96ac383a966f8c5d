#!/usr/bin/env bash
# Install visor_hf and its dependencies. The CPU build of torch is installed first, so that the package's
# `torch>=2.4` requirement is already met and pip does not fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -e ".[test,bench,train]"
