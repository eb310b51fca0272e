#!/usr/bin/env bash
# Co-LLM across model families: SmolLM2-135M-Instruct (Llama tokenizer, 49,152 tokens) writes, Qwen2.5-Coder
# (151,936 tokens) is the expert; the two collaborate through the text (collm.backends.cross).
#
#   bash scripts/install.sh --qwen && bash research/cross/cross.sh     # from nothing; re-run after a kill to resume
#   EXPERT=qwen2.5-coder-0.5b-instruct bash research/cross/cross.sh    # the smaller expert
#   UNTIL=heads bash research/cross/cross.sh                           # stop after a stage
#
# Stages (each skips when its output exists; scoring resumes from its shards):
#   1. data   collm data gsm (seed 0): train / validation / test templates; the first ROWS gold training rows
#   2. score  collm score: the expert's log-probabilities of the gold solutions in its own tokens, aligned to
#             SmolLM2's tokens by characters (collm.training.align)
#   3. heads  on the frozen SmolLM2: marginal likelihood after the weak start (collm), weak supervision (weak)
#   4. calibrate  eta on the validation templates, deferral rate <= MAX_DEFER
#   5. eval   the 220 test problems: base, expert (its own greedy text, through the base's tokens), Co-LLM at
#             eta, random deferral at its rate, the weak head (research/qwen/qwen_eval.py, resumable per system)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R=${RUNS:-runs/cross}
BASE=smollm2-135m-instruct
EXPERT=${EXPERT:-qwen2.5-coder-1.5b-instruct}
ROWS=${ROWS:-320}
MAX_DEFER=${MAX_DEFER:-0.3}
NEW=${NEW:-320}
DT=bfloat16
C=research/qwen/configs
UNTIL=${UNTIL:-}
stop() { [[ $UNTIL == "$1" ]] && { echo "stopped after $1"; exit 0; }; return 0; }

D=$R/data/gsm
[[ -f $D/manifest.json ]] || collm data gsm --out "$D"
[[ -f $R/train.jsonl ]] || head -n "$ROWS" "$D/train.jsonl" > "$R/train.jsonl"
stop data

collm score --config $C/score.yaml --expert $EXPERT --tokenizer $BASE --dtype $DT --data "$R/train.jsonl" \
  --out "$R/scores"
stop score

HEAD="--config $C/head-frozen.yaml --base $BASE --data $R/train.jsonl --scores $R/scores"
[[ -f $R/collm/collm.json ]] || collm train $HEAD --objective marginal --out "$R/collm"
[[ -f $R/weak/collm.json ]] || collm train $HEAD --objective weak --out "$R/weak"
stop heads

for run in collm weak; do
  [[ -f $R/$run/calibration.png ]] || collm calibrate --run "$R/$run" --data "$D/validation.jsonl" \
    --thresholds "${THRESHOLDS:-0.3,0.5,0.7}" --max-defer "$MAX_DEFER" --max-new-tokens $NEW --batch-size 22 \
    --no-baselines --dtype $DT --png "$R/$run/calibration.png"
done
stop calibrate

python research/qwen/qwen_eval.py --run "$R/collm" --weak-run "$R/weak" --data "$D/test.jsonl" \
  --max-new-tokens $NEW --batch-size 22 --dtype $DT --out "$R/eval-test"
stop eval
