#!/usr/bin/env bash
# Co-LLM across model families: SmolLM2-135M-Instruct (Llama tokenizer, 49,152 tokens) writes, Qwen2.5-Coder
# (151,936 tokens) is the expert; the two collaborate through the text (collm.backends.cross).
#
#   bash scripts/install.sh --qwen && bash research/cross/cross.sh     # from nothing; re-run after a kill to resume
#   EXPERT=qwen2.5-coder-1.5b-instruct bash research/cross/cross.sh    # the larger expert (about 3x the CPU time)
#   UNTIL=heads bash research/cross/cross.sh                           # stop after a stage
#
# Stages (each skips when its output exists; scoring resumes from its shards):
#   1. data   collm data gsm (seed 0): train / validation / test templates; the first ROWS gold training rows;
#             every 3rd validation row (37 problems, all 11 validation templates) for calibration
#   2. base_style  SmolLM2's own greedy solutions to BASE_ROWS other training problems, right or wrong: the
#             router's rows (what it reads at decoding time is its own writing)
#   3. score  collm score: the expert's log-probabilities of both row sets in its own tokens, aligned to
#             SmolLM2's tokens by characters (collm.training.align)
#   4. heads  on the frozen SmolLM2: marginal likelihood after the weak start (collm) and weak supervision (weak),
#             both on the gold rows, as the paper does; the router on the base's rows, labelled where the expert
#             would write another token (weak_label=disagree: research/qwen/configs/router.yaml)
#   5. calibrate  eta of each head on the 37 validation problems, deferral rate <= MAX_DEFER
#   6. eval   the 220 test problems: base, expert (its own greedy text, through the base's tokens), Co-LLM (the
#             head EVAL_RUN, default the router) at its eta, random deferral at its rate, and with WEAK=1 the weak
#             head (research/qwen/qwen_eval.py, resumable per system)
#   7. speed  ms/token at batch 1 over 8 whole answers to test rows spread over the file: base, expert, Co-LLM
#             (research/qwen/qwen_speed.py; its JSON holds the seam's counts)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
R=${RUNS:-runs/cross}
BASE=smollm2-135m-instruct
EXPERT=${EXPERT:-qwen2.5-coder-0.5b-instruct}
ROWS=${ROWS:-320}
BASE_ROWS=${BASE_ROWS:-160}
MAX_DEFER=${MAX_DEFER:-0.3}
NEW=${NEW:-320}
EVAL_RUN=${EVAL_RUN:-router}
DT=bfloat16
C=research/qwen/configs
UNTIL=${UNTIL:-}
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
stop() { [[ $UNTIL == "$1" ]] && { log "stopped after $1"; exit 0; }; return 0; }
mkdir -p "$R"

log "1. data"
D=$R/data/gsm
[[ -f $D/manifest.json ]] || collm data gsm --out "$D"
[[ -f $R/train.jsonl ]] || head -n "$ROWS" "$D/train.jsonl" > "$R/train.jsonl"
[[ -f $D/validation_every3.jsonl ]] || awk 'NR % 3 == 1' "$D/validation.jsonl" > "$D/validation_every3.jsonl"
stop data

log "2. base-style rows: SmolLM2's greedy solutions to $BASE_ROWS training problems (after the gold rows), all kept"
[[ -f $R/base_style/train.jsonl ]] || { tail -n +"$((ROWS + 1))" "$D/train.jsonl" > "$R/train-rest.jsonl";
  python research/qwen/own_style.py --model $BASE --data "$R/train-rest.jsonl" --rows "$BASE_ROWS" --batch-size 40 \
    --max-new-tokens $NEW --dtype $DT --keep all --out "$R/base_style"; }
stop base_style

log "3. expert scores ($EXPERT)"
SCORE="--config $C/score.yaml --expert $EXPERT --tokenizer $BASE --dtype $DT"
collm score $SCORE --data "$R/train.jsonl" --out "$R/scores"
collm score $SCORE --data "$R/base_style/train.jsonl" --out "$R/scores-base"
stop score

log "4. heads on the frozen SmolLM2"
HEAD="--config $C/head-frozen.yaml --base $BASE --data $R/train.jsonl --scores $R/scores"
[[ -f $R/collm/collm.json ]] || collm train $HEAD --objective marginal --out "$R/collm"
[[ -f $R/weak/collm.json ]] || collm train $HEAD --objective weak --out "$R/weak"
[[ -f $R/router/collm.json ]] || collm train --config $C/router.yaml --base $BASE --data "$R/base_style/train.jsonl" \
  --scores "$R/scores-base" --out "$R/router"
stop heads

log "5. calibrate eta on 37 validation problems, deferral rate <= $MAX_DEFER"
calibrate() {  # run $1 over grid $2
  [[ -f $R/$1/calibration.png ]] || collm calibrate --run "$R/$1" --data "$D/validation_every3.jsonl" \
    --thresholds "$2" --max-defer "$MAX_DEFER" --max-new-tokens $NEW --batch-size 37 --no-baselines --dtype $DT \
    --png "$R/$1/calibration.png"
}
# The paper's heads on gold text defer on 67-71% of the tokens at eta 0.8-0.9 (12 validation problems), far over
# the budget, so only the router is calibrated by default (CALIBRATE="router collm weak" for all three).
for run in ${CALIBRATE:-router}; do calibrate "$run" "${THRESHOLDS:-0.3,0.5,0.7}"; done
stop calibrate

log "6. eval: the 220 test problems"
python research/qwen/qwen_eval.py --run "$R/$EVAL_RUN" ${WEAK:+--weak-run "$R/weak"} --data "$D/test.jsonl" \
  --max-new-tokens $NEW --batch-size 55 --dtype $DT --out "$R/eval-test"
stop eval

log "7. speed at batch 1"
[[ -f $R/speed.json ]] || python research/qwen/qwen_speed.py --run "$R/$EVAL_RUN" --data "$D/test.jsonl" \
  --prompts 8 --spread --new-tokens $NEW --dtype $DT --no-hf --systems base,expert,collm --interleave \
  --json "$R/speed.json" --markdown "$R/speed.md"
log "done"
