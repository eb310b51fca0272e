#!/usr/bin/env bash
# Rebuild every artifact of the shipped Co-LLM run from nothing, offline, with collm's own stages:
#   data (GSM-Symbolic split by template, mathematics_dataset, calculation strings)
#   -> math expert (LoRA SFT of SmolLM2-135M-Instruct on calculations) -> expert scores on GSM train
#   -> Co-LLM (marginal likelihood, LoRA base + head), SFT base and weak-supervision head, same data and budget
#   -> thresholds calibrated on validation templates (deferral rate <= MAX_DEFER)
#   -> evaluation on held-out test templates and on train templates with new numbers (the first recipe)
#   -> scripts/frozen_sft.sh: a head on the frozen SFT base (the second recipe) -> src/collm/assets/gsm
#
#   bash scripts/reproduce.sh                  # DEVICE=cuda when a GPU is present, else cpu
#   RUNS=runs/x SMOKE=1 bash scripts/reproduce.sh   # minutes on CPU: tiny sizes, checks the wiring only
#
# Each stage skips when its output exists, and training resumes from checkpoints: re-run after a kill.
# Measured: ~8 min on one H100 (see README "Reproduce"); on 2 CPU cores expect well over a day.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1  # never reach for a hub (peft would try)

RUNS=${RUNS:-runs/repro}
DEVICE=${DEVICE:-$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
OUT_ASSETS=${OUT_ASSETS:-src/collm/assets/gsm}
MAX_DEFER=${MAX_DEFER:-0.3}
BASE=smollm2-135m-instruct
D=$RUNS/data
mkdir -p "$RUNS"

if [[ "${SMOKE:-0}" == 1 ]]; then
  CALC_ROWS=200; EXPERT=(--max-steps 2 --batch-size 4); TRAIN=(--max-steps 2 --batch-size 2 --weak-steps 5)
  EVAL=(--limit 3 --max-new-tokens 24 --batch-size 3); THRESHOLDS=0.3,1; PRECISION=fp32
else
  CALC_ROWS=30000; EXPERT=(--epochs 1 --batch-size 64); TRAIN=(--epochs 2 --batch-size 16)
  EVAL=(--max-new-tokens 256 --batch-size 128); THRESHOLDS=${THRESHOLDS:-0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1}; PRECISION=bf16
fi
[[ $DEVICE == cpu ]] && PRECISION=fp32

log() { echo "[$(date +%H:%M:%S)] $*"; }
# Run commands in parallel, logging each to its own file; fail if any fails.
par() {
  local pids=() name
  for cmd in "$@"; do
    name=$(echo "$cmd" | md5sum | cut -c1-8)
    bash -c "$cmd" >"$RUNS/log-$name.txt" 2>&1 & pids+=($!)
    log "started [$name] $cmd"
  done
  local failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  if (( failed )); then tail -n 30 "$RUNS"/log-*.txt; return 1; fi
}

log "data"
[[ -f $D/gsm/manifest.json ]] || collm data gsm --out "$D/gsm" --new-numbers-variants 3
[[ -f $D/arithmetic/manifest.json ]] || collm data arithmetic --out "$D/arithmetic"
GSM_TRAIN=$D/gsm/train.jsonl
if [[ "${SMOKE:-0}" == 1 ]]; then head -n 12 "$D/gsm/train.jsonl" > "$D/gsm/train-smoke.jsonl"; GSM_TRAIN=$D/gsm/train-smoke.jsonl; fi
[[ -f $D/calc/manifest.json ]] || collm data calc --out "$D/calc" --gsm "$D/gsm/train.jsonl" \
  --arithmetic "$D/arithmetic/train.jsonl" --rows $CALC_ROWS

log "math expert: LoRA r=32 on calculation strings + arithmetic (no word problems)"
if [[ ! -f $RUNS/expert/merged/config.json ]]; then
  collm train --objective sft --base $BASE --data "$D/calc/train.jsonl" --out "$RUNS/expert" \
    --base-mode lora --lora-r 32 --lora-alpha 64 --lr 1e-3 --warmup-steps 30 --max-len 256 \
    --precision $PRECISION --save-every 500 "${EXPERT[@]}"
  python3 -m collm.training.expert bf16 "$RUNS/expert/base_adapter"   # what ships; everything below uses it
  python3 -m collm.training.expert merge "$RUNS/expert/base_adapter" "$RUNS/expert/merged"
fi

log "expert scores on GSM train"
collm score --expert "$RUNS/expert/merged" --tokenizer $BASE --data "$GSM_TRAIN" --out "$RUNS/scores" \
  --max-len 512 --device "$DEVICE"

log "Co-LLM, SFT base, weak head: LoRA r=8, same data, steps and learning rate"
COMMON="--base $BASE --data $GSM_TRAIN --base-mode lora --lora-r 8 --lora-alpha 16 --lr 3e-4 \
  --max-len 512 --precision $PRECISION --save-every 500 ${TRAIN[*]}"
todo=()
for spec in "collm:--objective marginal --scores $RUNS/scores" "sft:--objective sft" \
            "weak:--objective weak --scores $RUNS/scores"; do
  name=${spec%%:*}
  [[ -f $RUNS/$name/collm.json ]] || todo+=("collm train $COMMON ${spec#*:} --out $RUNS/$name && \
    python3 -m collm.training.expert bf16 $RUNS/$name/base_adapter")
done
(( ${#todo[@]} == 0 )) || par "${todo[@]}"

log "calibrate thresholds on validation templates (deferral rate <= $MAX_DEFER)"
CAL="--data $D/gsm/validation.jsonl --max-defer $MAX_DEFER --thresholds $THRESHOLDS --device $DEVICE ${EVAL[*]}"
par "collm calibrate --run $RUNS/collm --png $RUNS/calibration.png $CAL" \
    "collm calibrate --run $RUNS/weak --no-baselines $CAL"

log "evaluate: held-out test templates, and train templates with new numbers"
EV="--run $RUNS/collm --weak-run $RUNS/weak --sft-run $RUNS/sft --device $DEVICE ${EVAL[*]}"
par "collm eval $EV --data $D/gsm/test.jsonl --json $RUNS/eval-test.json --markdown $RUNS/eval-test.md \
       --html $RUNS/eval-test.html" \
    "collm eval $EV --data $D/gsm/new_numbers.jsonl --json $RUNS/eval-new-numbers.json \
       --markdown $RUNS/eval-new-numbers.md"

log "second recipe (the shipped run): a head on the frozen SFT base -> $OUT_ASSETS"
REPRO=$RUNS DATA=$D/gsm OUT=$RUNS/frozen OUT_ASSETS=$OUT_ASSETS DEVICE=$DEVICE SMOKE=${SMOKE:-0} bash scripts/frozen_sft.sh
log "done"
