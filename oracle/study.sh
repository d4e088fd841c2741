#!/usr/bin/env bash
# The study: does SPA's loop move a model the way the paper says, beyond noise? The embedded
# model, a judge of known rules (oracle/judge.py), 240 real harmful requests for training,
# 60 for validation (TrustLLM's misuse set) and 120 held-out prompts from another source
# (XSTest v2), 3 seeds of the whole loop, and the variants vanilla, SPA, the reverse priority,
# SPA without denoising and SPA with w = 1 (simpo). Every stage resumes: rerun after a kill.
# oracle/study.py then measures the chain link by link and writes one table and one picture.
#   make study                 (SEEDS="1 2 3" LR=... EPOCHS=... override the settings)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
RUN=${RUN:-runs/study}
PORT=${PORT:-8766}  # fixed, so that a rerun resumes (the judge's address is part of the settings)
SEEDS=${SEEDS:-1 2 3}
LR=${LR:-3e-4}      # chosen on the validation split (README: what was tried)
EPOCHS=${EPOCHS:-1}
VARIANTS=${VARIANTS:-spa simpo reverse nodenoise}
$PY oracle/judge.py --port "$PORT" & JUDGE_PID=$!
trap 'kill $JUDGE_PID 2>/dev/null' EXIT
J=(--judge-api-base "http://127.0.0.1:$PORT/v1" --judge-model oracle --backoff 0.1)
P=(--primary harmlessness)   # score.py and evaluate.py; refine.py reads the objectives from the scored file
V=SmolLM2-135M-Instruct
start=$SECONDS
sleep 2
kill -0 $JUDGE_PID 2>/dev/null || { echo "study: the judge did not start on port $PORT (is one already running?)" >&2; exit 1; }
mkdir -p "$RUN"
cat data/study_train.jsonl data/study_val.jsonl > "$RUN/prompts.jsonl"

loop() {  # seed dir, seed: sample, score and refine the training and validation prompts together
  $PY sample.py --input "$RUN/prompts.jsonl" --output "$1/samples.jsonl" --num-candidates 4 --max-new-tokens 48 \
      --batch-size 30 --seed "$2"
  $PY score.py --input "$1/samples.jsonl" --output "$1/scored.jsonl" "${J[@]}" "${P[@]}" --judge-concurrency 16
  $PY refine.py --input "$1/scored.jsonl" --output "$1/refined.jsonl" "${J[@]}" --max-new-tokens 48 --batch-size 30 \
      --seed "$2"
  $PY oracle/study.py split "$1/refined.jsonl" data/study_val.jsonl "$1/train_refined.jsonl" "$1/val_refined.jsonl"
}

pairs() {  # seed dir, variant, denoise flags, order, pairs per prompt: the variant's training and held-out (validation) pairs
  mkdir -p "$1/$2"
  for part in train val; do
    $PY denoise.py --input "$1/${part}_refined.jsonl" --output "$1/$2/${part}_denoised.jsonl" $3
    $PY pairs.py --input "$1/$2/${part}_denoised.jsonl" --output "$1/$2/${part}_pairs.jsonl" --delta 2 \
        --max-pairs-per-prompt "$5" --order "$4"
  done
}

train() {  # seed dir, variant, loss, seed
  [ -f "$1/$2/model/config.json" ] && return
  $PY train.py --input "$1/$2/train_pairs.jsonl" --eval-input "$1/$2/val_pairs.jsonl" --output "$1/$2/model" --model $V \
      --loss "$3" --lr "$LR" --epochs "$EPOCHS" --batch-size 4 --grad-accum 2 --max-length 256 --save-every 10 \
      --seed "$4" --no-gradient-checkpointing $( [ -d "$1/$2/model/checkpoint" ] && echo --resume )
}

evaluate() {  # model, name, output: greedy answers to the held-out prompts, judged, against vanilla's
  $PY evaluate.py --input data/study_heldout.jsonl --output "$3" --model "$1" --name "$2" --baseline $V \
      --baseline-name Vanilla "${J[@]}" "${P[@]}" --max-new-tokens 48 --batch-size 40 --judge-concurrency 16
}

for s in $SEEDS; do
  d=$RUN/seed$s
  loop "$d" "$s"
  # consistency off: under conflicting rules almost no refined answer beats every candidate on both axes.
  # Without denoising (every prompt kept) one pair a prompt, about as many pairs as SPA's two a kept prompt.
  informative="--no-consistency --tau-quantile 0.75"
  pairs "$d" spa "$informative" primary-first 2
  pairs "$d" reverse "$informative" helpfulness-first 2
  pairs "$d" nodenoise "--no-consistency --no-informativeness" primary-first 1
  mkdir -p "$d/simpo" && cp "$d"/spa/*_pairs.jsonl "$d/simpo/"   # SPA's pairs, trained with w = 1
  for v in $VARIANTS; do
    train "$d" "$v" "$([ "$v" = simpo ] && echo simpo || echo spa)" "$s"
    evaluate "$d/$v/model" "$v" "$d/$v/eval"
  done
done
[ "$VARIANTS" = "spa simpo reverse nodenoise" ] && $PY oracle/study.py report "$RUN" --seeds $SEEDS --output "$RUN/summary"
echo "study: done in $((SECONDS - start)) s; the table and picture are in $RUN/summary"
