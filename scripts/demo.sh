#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the default demo on CPU, offline: the safety-aware search and
# the domain-only search on the embedded default world, then the side-by-side evaluation on the
# test splits. Prints the path of the report (runs/demo/demo.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m optimize.demo --config configs/demo.yaml "$@"
