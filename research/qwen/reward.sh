#!/usr/bin/env bash
# The reward-trained router on the Qwen pair (collm reward), from the shipped router-policy head.
#   bash scripts/install.sh --qwen && bash research/qwen/reward.sh     # re-run after a kill: it resumes
#   PRICE=0.004 LR=1e-4 UPDATES=4 ROUNDS=12 bash research/qwen/reward.sh   # another lambda, rate, steps, more rounds
# The recipe is research/qwen/configs/reward.yaml (rollouts on the GSM-Symbolic train templates, 32 problems x 4
# answers a round at 320 new tokens, bf16); this script adds the price, the learning rate, the optimizer steps per
# round and the rounds, one thread unless OMP_NUM_THREADS says otherwise.
# Run folders do not outlive a session's machine, so after every round the script copies what a resume needs
# (reward_config.json, checkpoints/, metrics.jsonl: about 50 kB) to research/qwen/results/reward/<name>/, and
# a fresh checkout restores it from there before resuming; commit that folder to keep the rounds.
# Then calibrate on the 110 validation problems and evaluate on the 220 test problems:
#   STAGE=calibrate bash research/qwen/reward.sh ; STAGE=eval bash research/qwen/reward.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R=${RUNS:-runs/qwen}
D=$R/data/gsm
PRICE=${PRICE:-0.008}
LR=${LR:-0.0002}
UPDATES=${UPDATES:-16}
ROUNDS=${ROUNDS:-8}
NAME=reward-price$PRICE-lr$LR-updates$UPDATES
OUT=$R/$NAME
KEEP=research/qwen/results/reward/$NAME
[[ -f $D/manifest.json ]] || collm data gsm --out "$D"
case ${STAGE:-train} in
  train)
    if [[ ! -d $OUT/checkpoints && -d $KEEP/checkpoints ]]; then  # a fresh checkout: resume from the kept rounds
      mkdir -p "$OUT" && cp -r "$KEEP/checkpoints" "$KEEP/reward_config.json" "$KEEP/metrics.jsonl" "$OUT/"
    fi
    done_rounds=0; [[ -f $OUT/metrics.jsonl ]] && done_rounds=$(wc -l < "$OUT/metrics.jsonl")
    for ((r = done_rounds + 1; r <= ROUNDS; r++)); do  # one round per call: each resumes the last, kept before the next
      collm reward --config research/qwen/configs/reward.yaml --out "$OUT" --price "$PRICE" --lr "$LR" \
        --updates "$UPDATES" --rounds "$r"
      # the new copy is whole before the old one goes (.tmp and .old are this script's own names)
      rm -rf "$KEEP.tmp" "$KEEP.old" && mkdir -p "$KEEP.tmp" && cp -r "$OUT/checkpoints" "$OUT/reward_config.json" \
        "$OUT/metrics.jsonl" "$KEEP.tmp/"
      if [[ -d $KEEP ]]; then mv "$KEEP" "$KEEP.old"; fi
      mv "$KEEP.tmp" "$KEEP" && rm -rf "$KEEP.old"
    done ;;
  calibrate)
    collm calibrate --run "$OUT" --data "$D/validation.jsonl" --thresholds "${THRESHOLDS:-0.4,0.5,0.6,0.7}" \
      --max-new-tokens 320 --batch-size 55 --no-baselines --dtype bfloat16 --png "$OUT/calibration.png" ;;
  eval)
    collm eval --run "$OUT" --data "$D/test.jsonl" --max-new-tokens 320 --batch-size 55 --dtype bfloat16 \
      --json "$OUT/test_results.json" --markdown "$OUT/test_results.md" ;;
  *) echo "STAGE is train, calibrate or eval" >&2; exit 2 ;;
esac
