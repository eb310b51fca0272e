#!/usr/bin/env bash
# Third device call: the compiled static path at batch 1 and f = 0.1 only, after the router fix.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/transformers-*.whl && export PYTHONPATH=/tmp/site:$PWD/src
export PYTHONUNBUFFERED=1
timeout 170 python3 -m collm.cli bench --shapes llama-1b+llama-8b --dtype bfloat16 --device cuda --prompt-len 32 \
  --new-tokens 128 --repeats 5 --batch 1 --fractions 0.1 --systems base,expert,collm --compile \
  --json $OUT/gpu_compiled_f01.json --markdown $OUT/gpu_compiled_f01.md 2>&1 | tail -8
