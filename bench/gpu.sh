#!/usr/bin/env bash
# The GPU measurements for the fast path, in one device call (see bench/README.md).
# Expects the transformers wheel under .whl/ (carried) and writes everything to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 120 python3 -m pytest -q -m gpu tests/test_decode.py -p no:cacheprovider 2>&1 | tail -5
common="--shapes llama-1b+llama-8b --dtype bfloat16 --device cuda --prompt-len 32 --new-tokens 128 --repeats 3"
timeout 300 python3 -m collm.cli bench $common --batch 1 \
  --systems base,expert,collm,naive,hf_base,hf_expert,hf_base_static,hf_expert_static \
  --json $OUT/gpu_b1.json --markdown $OUT/gpu_b1.md --png $OUT/gpu_b1.png 2>&1 | tail -40
timeout 240 python3 -m collm.cli bench $common --batch 8,16,32 --fractions 0,0.1,0.5,1 \
  --systems base,expert,collm --json $OUT/gpu_batch.json --markdown $OUT/gpu_batch.md 2>&1 | tail -40
