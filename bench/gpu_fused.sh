#!/usr/bin/env bash
# The fused step (collm.decoding.fused) on a lent GPU, in two device calls of under 10 minutes each (carry .whl):
#   bash bench/gpu_fused.sh 1   # the GPU exactness tests, then compiled batch 1 with the step fused
#   bash bench/gpu_fused.sh 2   # compiled batch 1 step by step (--no-fused), then batch 1 vs 16, fused
# Same shapes and router as bench/gpu_compile.sh; outputs land in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/transformers-*.whl && export PYTHONPATH=/tmp/site:$PWD/src
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
common="--shapes llama-1b+llama-8b --dtype bfloat16 --device cuda --prompt-len 32 --new-tokens 128 --repeats 5"
compiled() {
  timeout 380 python3 -m collm.cli bench $common --batch 1 --fractions 0,0.1,1 --systems base,expert,collm \
    --compile --$1 --json $OUT/gpu_compiled_$1.json --markdown $OUT/gpu_compiled_$1.md 2>&1 | tail -8
}
if [[ "${1:-1}" == 1 ]]; then
  timeout 200 python3 -m pytest -q -m gpu tests/test_decode.py -p no:cacheprovider 2>&1 | tail -5
  compiled fused
else
  compiled no-fused
  timeout 200 python3 -m collm.cli bench $common --batch 1,16 --fractions 0.1 --systems base,collm \
    --json $OUT/gpu_fused_batch.json --markdown $OUT/gpu_fused_batch.md 2>&1 | tail -8
fi
