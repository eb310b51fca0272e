#!/usr/bin/env bash
# The fused step (collm.fused) on a lent GPU, in one device call (carry .whl):
#   the GPU exactness tests, then the compiled static path at batch 1 with the step fused and step by step
#   (same shapes and router as bench/gpu_compile.sh), then batch 16 against batch 1 fused.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/transformers-*.whl && export PYTHONPATH=/tmp/site:$PWD/src
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 240 python3 -m pytest -q -m gpu tests/test_decode.py -p no:cacheprovider 2>&1 | tail -5
common="--shapes llama-1b+llama-8b --dtype bfloat16 --device cuda --prompt-len 32 --new-tokens 128 --repeats 5"
for mode in fused no-fused; do
  timeout 300 python3 -m collm.cli bench $common --batch 1 --fractions 0,0.1,1 --systems base,expert,collm \
    --compile --$mode --json $OUT/gpu_compiled_$mode.json --markdown $OUT/gpu_compiled_$mode.md 2>&1 | tail -8
done
timeout 200 python3 -m collm.cli bench $common --batch 1,16 --fractions 0.1 --systems base,collm \
  --json $OUT/gpu_fused_batch.json --markdown $OUT/gpu_fused_batch.md 2>&1 | tail -8
