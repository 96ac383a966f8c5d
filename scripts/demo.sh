#!/usr/bin/env bash
# Set up and run the main job: adaptive inference with the shipped toy VISOR on freshly generated pictures
# (extra arguments go to `visor-hf toy`, e.g. --images 8 --seed 7).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
visor-hf toy "$@"
