#!/usr/bin/env bash
# The whole SPA pipeline on the embedded default model, sized for a 2-core CPU.
# Every stage's output stays under $RUN/iter$ITER; a rerun resumes instead of redoing.
#   bash demo.sh              iteration 1, then the before/after evaluation
#   ITER=2 bash demo.sh       a second iteration, starting from iteration 1's model
#   bash demo.sh ablations    without denoising, and simpo / dpo / sft instead of spa
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python}
RUN=${RUN:-runs/demo}
ITER=${ITER:-1}
PRIMARY=harmlessness
JUDGE=(--mode logits-expected)   # the 135M judge's most likely rating never moves
start=$SECONDS

iteration() {  # $1 = iteration number
  local dir=$RUN/iter$1 model=SmolLM2-135M-Instruct
  [ "$1" -gt 1 ] && model=$RUN/iter$(($1 - 1))/model
  mkdir -p "$dir"
  $PY sample.py --input data/train_prompts.jsonl --output "$dir/samples.jsonl" --model "$model" \
      --num-candidates 4 --max-new-tokens 64 --batch-size 42 --seed "$1"
  $PY score.py --input "$dir/samples.jsonl" --output "$dir/scored.jsonl" --model "$model" "${JUDGE[@]}" \
      --primary $PRIMARY --batch-size 42 --judge-batch-size 42   # judge prompts 42 at a time, a question's side by side
  $PY refine.py --input "$dir/scored.jsonl" --output "$dir/refined.jsonl" --model "$model" "${JUDGE[@]}" \
      --max-new-tokens 96 --batch-size 42 --judge-batch-size 42
  $PY denoise.py --input "$dir/refined.jsonl" --output "$dir/denoised.jsonl" --tau-quantile 0.5 --no-consistency
  $PY pairs.py --input "$dir/denoised.jsonl" --output "$dir/pairs.jsonl" --delta 1 --max-pairs-per-prompt 3
  train "$dir/pairs.jsonl" "$dir/model" "$model" spa
}

train() {  # pairs, output, starting model, loss
  [ -f "$2/config.json" ] && { echo "train: $2 exists, skipped"; return; }
  # 135M parameters: the activations fit, so none are recomputed (checkpointing costs a quarter of a step)
  $PY train.py --input "$1" --output "$2" --model "$3" --loss "$4" --lr 2e-5 --batch-size 4 --grad-accum 2 \
      --max-length 384 --save-every 5 --no-gradient-checkpointing $( [ -d "$2/checkpoint" ] && echo --resume )
}

evaluate() {  # model, name, output
  $PY evaluate.py --input data/eval_prompts.jsonl --output "$3" --model "$1" --name "$2" \
      --baseline SmolLM2-135M-Instruct --baseline-name Vanilla --judge SmolLM2-135M-Instruct --primary $PRIMARY \
      "${JUDGE[@]}" --max-new-tokens 96 \
      --judge-max-tokens 24 --batch-size 21 --judge-batch-size 42   # 21 comparisons x 2 orders: one generate call
}

if [ "${1:-}" = ablations ]; then
  dir=$RUN/iter1
  $PY denoise.py --input "$dir/refined.jsonl" --output "$dir/ablation-nodenoise/denoised.jsonl" \
      --no-consistency --no-informativeness
  $PY pairs.py --input "$dir/ablation-nodenoise/denoised.jsonl" --output "$dir/ablation-nodenoise/pairs.jsonl" \
      --delta 1 --max-pairs-per-prompt 3
  train "$dir/ablation-nodenoise/pairs.jsonl" "$dir/ablation-nodenoise/model" SmolLM2-135M-Instruct spa
  evaluate "$dir/ablation-nodenoise/model" "SPA w/o denoising" "$dir/ablation-nodenoise/eval"
  for loss in simpo dpo sft; do
    train "$dir/pairs.jsonl" "$dir/ablation-$loss/model" SmolLM2-135M-Instruct $loss
    evaluate "$dir/ablation-$loss/model" "$loss" "$dir/ablation-$loss/eval"
  done
  $PY report.py "$dir/eval" "$dir"/ablation-*/eval --output "$RUN/summary"   # one table, one picture
  exit 0
fi

for i in $(seq 1 "$ITER"); do iteration "$i"; done
evaluate "$RUN/iter$ITER/model" "SPA (iter $ITER)" "$RUN/iter$ITER/eval"
$PY check_run.py "$RUN/iter$ITER"
echo "demo: done in $((SECONDS - start)) s; every stage's output is under $RUN/iter$ITER"
