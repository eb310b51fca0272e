#!/usr/bin/env bash
# The second recipe (the shipped run): keep the reproduction's SFT base frozen and train only a deferral head,
# by marginal likelihood against its math expert, on 600 GSM training rows; a weak-supervision head beside it.
# Thresholds are chosen on 100 new-number variants of training templates (the validation *templates* give every
# system 0/110, so they cannot choose anything); evaluation on the other 107 variants and on the held-out test
# templates (220). Then the run is packaged into src/collm/assets/gsm.
#   REPRO=runs/repro bash scripts/frozen_sft.sh       # scripts/reproduce.sh calls it as its last stage
# REPRO must hold the reproduction's sft/ and expert/ runs and data/gsm. Each stage skips when its output exists;
# re-run after a kill. Measured on 2 CPU cores: see README "Reproduce".
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
REPRO=${REPRO:-runs/repro}
DATA=${DATA:-$REPRO/data/gsm}
OUT=${OUT:-$REPRO/frozen}
OUT_ASSETS=${OUT_ASSETS:-src/collm/assets/gsm}
DEVICE=${DEVICE:-cpu}
if [[ "${SMOKE:-0}" == 1 ]]; then
  ROWS=(8 6); TRAIN=(--max-steps 2 --weak-steps 5); EVAL=(--limit 3 --max-new-tokens 24 --batch-size 3)
else
  ROWS=(600 100); TRAIN=(--epochs 4); EVAL=(--max-new-tokens 200 --batch-size 55)
fi
log() { echo "[$(date +%H:%M:%S)] $*"; }
mkdir -p "$OUT"

log "rows: ${ROWS[0]} train, ${ROWS[1]} new-number variants to choose thresholds, the rest of them to evaluate"
python3 - "$DATA" "$OUT" "${ROWS[@]}" <<'PY'
import random, sys
data, out, n_train, n_cal = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
train = open(f"{data}/train.jsonl").read().splitlines(); random.Random(0).shuffle(train)
new = open(f"{data}/new_numbers.jsonl").read().splitlines(); random.Random(0).shuffle(new)
for name, rows in (("train", train[:n_train]), ("newnum", new[:n_cal]), ("newnum_rest", new[n_cal:])):
    open(f"{out}/{name}.jsonl", "w").write("\n".join(rows) + "\n")
PY

log "expert scores"
collm score --expert "$REPRO/expert/base_adapter" --data "$OUT/train.jsonl" --out "$OUT/scores" --device "$DEVICE"
log "heads on the frozen SFT base: marginal likelihood (after a weak start), and weak supervision alone"
HEAD="--base $REPRO/sft/base_adapter --data $OUT/train.jsonl --scores $OUT/scores --base-mode frozen \
  --head-lr 3e-3 --batch-size 8 --save-every 100 ${TRAIN[*]}"
[[ -f $OUT/collm/collm.json ]] || collm train $HEAD --objective marginal --out "$OUT/collm"
[[ -f $OUT/weak/collm.json ]] || collm train $HEAD --objective weak --out "$OUT/weak"

log "thresholds on new-number variants"
CAL="--data $OUT/newnum.jsonl --max-defer 0.3 --thresholds 0.2,0.4,0.6,0.8,1 --device $DEVICE ${EVAL[*]}"
[[ -f $OUT/calibrated-collm ]] || { collm calibrate --run "$OUT/collm" --png "$OUT/calibration.png" $CAL; touch "$OUT/calibrated-collm"; }
[[ -f $OUT/calibrated-weak ]] || { collm calibrate --run "$OUT/weak" --no-baselines $CAL; touch "$OUT/calibrated-weak"; }

log "evaluate: the other new-number variants, then the held-out test templates"
EV="--run $OUT/collm --weak-run $OUT/weak --sft-run $REPRO/sft --device $DEVICE ${EVAL[*]}"
[[ -f $OUT/eval-new-numbers.json ]] || collm eval $EV --data "$OUT/newnum_rest.jsonl" \
  --json "$OUT/eval-new-numbers.json" --markdown "$OUT/eval-new-numbers.md"
[[ -f $OUT/eval-test.json ]] || collm eval $EV --data "$DATA/test.jsonl" --json "$OUT/eval-test.json" \
  --markdown "$OUT/eval-test.md" --html "$OUT/eval-test.html"

log "package into $OUT_ASSETS"
python3 -m collm.demo package "$OUT" "$OUT_ASSETS" --sft "$REPRO/sft" --expert "$REPRO/expert"
log "done"
