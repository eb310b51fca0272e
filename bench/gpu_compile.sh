#!/usr/bin/env bash
# Second device call: the compiled static path at batch 1 (compile time is spent in warm-up).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/transformers-*.whl && export PYTHONPATH=/tmp/site:$PWD/src
export PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q -m gpu tests/test_decode.py -p no:cacheprovider 2>&1 | tail -5
timeout 380 python3 -m collm.cli bench --shapes llama-1b+llama-8b --dtype bfloat16 --device cuda --prompt-len 32 \
  --new-tokens 128 --repeats 3 --batch 1 --fractions 0,0.1,1 --systems base,expert,collm --compile \
  --json $OUT/gpu_compiled_b1.json --markdown $OUT/gpu_compiled_b1.md 2>&1 | tail -30
