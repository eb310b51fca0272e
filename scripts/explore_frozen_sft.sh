#!/usr/bin/env bash
# Exploration after the first reproduction (issue 5), on CPU in ~45 minutes: keep the reproduction's SFT base
# frozen and train only a deferral head by marginal likelihood against its math expert, on 600 GSM training
# rows; choose the threshold on 100 new-number variants and evaluate on the other 107.
#   REPRO=runs/gpu/runs/repro OUT=runs/explore bash scripts/explore_frozen_sft.sh
# REPRO must hold the reproduction's sft/ and expert/ runs and data/gsm (scripts/reproduce.sh writes them).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
REPRO=${REPRO:-runs/repro}
DATA=${DATA:-$REPRO/data/gsm}
OUT=${OUT:-runs/explore}
mkdir -p "$OUT"
python3 - "$DATA" "$OUT" <<'PY'
import random, sys
data, out = sys.argv[1:]
train = open(f"{data}/train.jsonl").read().splitlines(); random.Random(0).shuffle(train)
new = open(f"{data}/new_numbers.jsonl").read().splitlines(); random.Random(0).shuffle(new)
for name, rows in (("train", train[:600]), ("newnum", new[:100]), ("newnum_rest", new[100:])):
    open(f"{out}/{name}.jsonl", "w").write("\n".join(rows) + "\n")
PY
collm score --expert "$REPRO/expert/base_adapter" --data "$OUT/train.jsonl" --out "$OUT/scores"
collm train --base "$REPRO/sft/base_adapter" --data "$OUT/train.jsonl" --scores "$OUT/scores" --out "$OUT/frozen" \
  --base-mode frozen --epochs 4 --head-lr 3e-3
collm calibrate --run "$OUT/frozen" --data "$OUT/newnum.jsonl" --thresholds 0.2,0.4,0.6,0.8,1 \
  --max-new-tokens 200 --batch-size 50 --png "$OUT/calibration.png"
collm eval --run "$OUT/frozen" --data "$OUT/newnum_rest.jsonl" --max-new-tokens 200 --batch-size 54 \
  --json "$OUT/eval_rest.json" --markdown "$OUT/eval_rest.md"
