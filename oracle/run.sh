#!/usr/bin/env bash
# The evidence experiment: SPA's loop on the embedded model with a judge of known preferences
# (oracle/judge.py, served on 127.0.0.1), then every model evaluated on the held-out prompts
# by the same judge: vanilla, SPA iterations 1 and 2, the ablations (w/o denoising, simpo,
# dpo, sft, the reverse priority), Reward Soups at 6:4..9:1, and Self-Criticism (SFT on the
# refined answers). Ends with one table and one picture (report.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
RUN=${RUN:-runs/oracle}
PORT=${PORT:-8765}  # fixed, so that a rerun resumes (the judge's address is part of the settings)
$PY oracle/judge.py --port "$PORT" & JUDGE_PID=$!
trap 'kill $JUDGE_PID 2>/dev/null' EXIT
J=(--judge-api-base "http://127.0.0.1:$PORT/v1" --judge-model oracle --backoff 0.1)
P=(--primary harmlessness)   # score.py and evaluate.py; refine.py reads the objectives from the scored file
V=SmolLM2-135M-Instruct
TRAIN=(--lr 5e-5 --batch-size 4 --grad-accum 2 --max-length 320 --epochs 1 --save-every 5)
start=$SECONDS
sleep 2

generate() {  # iteration dir, starting model
  $PY sample.py --input data/train_prompts.jsonl --output "$1/samples.jsonl" --model "$2" --num-candidates 4 \
      --max-new-tokens 64 --batch-size 14 --seed 1
  $PY score.py --input "$1/samples.jsonl" --output "$1/scored.jsonl" --model "$2" "${J[@]}" "${P[@]}"
  $PY refine.py --input "$1/scored.jsonl" --output "$1/refined.jsonl" --model "$2" "${J[@]}" --max-new-tokens 96 \
      --batch-size 14
}

pairs() {  # iteration dir, name, denoise flags, pairs order
  mkdir -p "$1/$2"
  $PY denoise.py --input "$1/refined.jsonl" --output "$1/$2/denoised.jsonl" $3
  $PY pairs.py --input "$1/$2/denoised.jsonl" --output "$1/$2/pairs.jsonl" --delta 2 --max-pairs-per-prompt 2 --order "$4"
}

train() {  # pairs, output, starting model, loss
  [ -f "$2/config.json" ] && { echo "train: $2 exists, skipped"; return; }
  $PY train.py --input "$1" --output "$2" --model "$3" --loss "$4" "${TRAIN[@]}" $( [ -d "$2/checkpoint" ] && echo --resume )
}

evaluate() {  # model, name, output
  $PY evaluate.py --input data/eval_prompts.jsonl --output "$3" --model "$1" --name "$2" --baseline $V \
      --baseline-name Vanilla "${J[@]}" "${P[@]}" --max-new-tokens 48
}

# Consistency is off: with rules that conflict, the refined answer almost never beats every
# candidate on both axes (measured: 42 of 42 prompts inconsistent), as in the demo.
it1=$RUN/iter1 it2=$RUN/iter2
generate "$it1" $V
pairs "$it1" spa "--no-consistency --tau-quantile 0.5" primary-first
pairs "$it1" nodenoise "--no-consistency --no-informativeness" primary-first
pairs "$it1" reverse "--no-consistency --tau-quantile 0.5" helpfulness-first
pairs "$it1" primary-only "--no-consistency --tau-quantile 0.5" primary-only
pairs "$it1" helpfulness-only "--no-consistency --tau-quantile 0.5" helpfulness-only
train "$it1/spa/pairs.jsonl" "$it1/spa/model" $V spa
for loss in simpo dpo sft; do train "$it1/spa/pairs.jsonl" "$it1/$loss/model" $V $loss; done
for v in nodenoise reverse primary-only helpfulness-only; do train "$it1/$v/pairs.jsonl" "$it1/$v/model" $V spa; done
# Self-Criticism, as SFT on the model's own refined answers (every prompt)
$PY -c 'import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(json.dumps({"id": r["id"], "prompt": r["prompt"], "chosen": r["refined"]["text"], "rejected": r["candidates"][0]["text"]}))' \
    "$it1/refined.jsonl" > "$it1/selfcrit-pairs.jsonl"
train "$it1/selfcrit-pairs.jsonl" "$it1/selfcrit/model" $V sft
for w in 6 7 8 9; do
  [ -f "$RUN/soup-$w/config.json" ] || $PY oracle/soup.py --first "$it1/primary-only/model" \
      --second "$it1/helpfulness-only/model" --weight "0.$w" --output "$RUN/soup-$w"
done
generate "$it2" "$it1/spa/model"
pairs "$it2" spa "--no-consistency --tau-quantile 0.5" primary-first
train "$it2/spa/pairs.jsonl" "$it2/spa/model" "$it1/spa/model" spa

evaluate "$it1/spa/model" "SPA (iter 1)" "$RUN/eval/spa1"
evaluate "$it2/spa/model" "SPA (iter 2)" "$RUN/eval/spa2"
for v in nodenoise simpo dpo sft reverse selfcrit; do evaluate "$it1/$v/model" "$v" "$RUN/eval/$v"; done
for w in 6 7 8 9; do evaluate "$RUN/soup-$w" "soup $w:$((10 - w))" "$RUN/eval/soup-$w"; done
$PY report.py "$RUN"/eval/spa1 "$RUN"/eval/spa2 "$RUN"/eval/{nodenoise,simpo,dpo,sft,reverse,selfcrit} \
    "$RUN"/eval/soup-{6,7,8,9} --output "$RUN/summary"
echo "oracle: done in $((SECONDS - start)) s; the table and result.svg are in $RUN/summary"
