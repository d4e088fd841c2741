#!/usr/bin/env bash
# The study: does SPA's loop move a model the way the paper says, beyond noise? The embedded
# model, a judge of known rules (oracle/judge.py), 240 real harmful requests for training,
# 60 for validation (TrustLLM's misuse set) and 120 held-out prompts from another source
# (XSTest v2, safe and unsafe halves), 3 seeds of the whole loop, and the variants vanilla, SPA,
# the reverse priority, the random-order control (SPA's pairs, each order a seeded coin), SFT on
# the refined answers, and SPA and the control at a learning rate 10x lower for LOW_EPOCHS epochs
# (VARIANTS may add nodenoise, SPA without denoising, and simpo, SPA with w = 1). Every stage
# resumes: rerun after a kill.
# oracle/study.py then measures the chain link by link, the contrasts that separate the order's
# effect from training's, and writes the tables and one picture; RUN/summary/time.txt says
# where the time went.
#   make study                 (SEEDS="1 2 3" LR=... EPOCHS=... VARIANTS=... override the settings)
#   SELF=1 make study-self     one seed of SPA judging itself (the embedded model, logits-expected)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
RUN=${RUN:-runs/study}
PORT=${PORT:-8766}  # fixed, so that a rerun resumes (the judge's address is part of the settings)
SEEDS=${SEEDS:-1 2 3}
LR=${LR:-3e-4}      # chosen on the validation split (README: what was tried)
EPOCHS=${EPOCHS:-1}
LOW_LR=${LOW_LR:-3e-5}
LOW_EPOCHS=${LOW_EPOCHS:-2}
VARIANTS=${VARIANTS:-spa reverse random sft spa_lowlr random_lowlr}   # also: simpo nodenoise
TRAIN_PROMPTS=${TRAIN_PROMPTS:-data/study_train.jsonl}   # smaller files make a smoke run
VAL_PROMPTS=${VAL_PROMPTS:-data/study_val.jsonl}
HELDOUT=${HELDOUT:-data/study_heldout.jsonl}
SELF=${SELF:-0}     # 1: the model judges its own candidates and refined answers (score.py, refine.py)
$PY oracle/judge.py --port "$PORT" & JUDGE_PID=$!
trap 'kill $JUDGE_PID 2>/dev/null' EXIT
J=(--judge-api-base "http://127.0.0.1:$PORT/v1" --judge-model oracle --backoff 0.1)
P=(--primary harmlessness)   # score.py and evaluate.py; refine.py reads the objectives from the scored file
V=SmolLM2-135M-Instruct
start=$SECONDS
declare -A spent=()
timed() {  # what, command...: run it, adding its seconds to spent[what]
  local what=$1 t=$SECONDS
  shift
  "$@"
  spent[$what]=$(( ${spent[$what]:-0} + SECONDS - t ))
}
sleep 2
kill -0 $JUDGE_PID 2>/dev/null || { echo "study: the judge did not start on port $PORT (is one already running?)" >&2; exit 1; }
mkdir -p "$RUN"
cat "$TRAIN_PROMPTS" "$VAL_PROMPTS" > "$RUN/prompts.jsonl"

if [ "$SELF" = 1 ]; then
  LOOP_J=(--mode logits-expected)   # the model judges itself, as the paper's method has it
else
  LOOP_J=("${J[@]}" --judge-concurrency 16)
fi

loop() {  # seed dir, seed: sample, score and refine the training and validation prompts together
  timed sample $PY sample.py --input "$RUN/prompts.jsonl" --output "$1/samples.jsonl" --num-candidates 4 \
      --max-new-tokens 48 --batch-size 30 --seed "$2"
  timed score $PY score.py --input "$1/samples.jsonl" --output "$1/scored.jsonl" "${LOOP_J[@]}" "${P[@]}"
  timed refine $PY refine.py --input "$1/scored.jsonl" --output "$1/refined.jsonl" "${LOOP_J[@]}" --max-new-tokens 48 \
      --batch-size 30 --seed "$2"
  $PY oracle/study.py split "$1/refined.jsonl" "$VAL_PROMPTS" "$1/train_refined.jsonl" "$1/val_refined.jsonl"
}

pairs() {  # seed dir, variant, denoise flags, order, pairs per prompt: the variant's training and held-out (validation) pairs
  mkdir -p "$1/$2"
  for part in train val; do
    $PY denoise.py --input "$1/${part}_refined.jsonl" --output "$1/$2/${part}_denoised.jsonl" $3
    $PY pairs.py --input "$1/$2/${part}_denoised.jsonl" --output "$1/$2/${part}_pairs.jsonl" --delta 2 \
        --max-pairs-per-prompt "$5" --order "$4"
  done
}

train() {  # seed dir, variant, loss, seed, lr, epochs
  [ -f "$1/$2/model/config.json" ] && return
  timed train $PY train.py --input "$1/$2/train_pairs.jsonl" --eval-input "$1/$2/val_pairs.jsonl" \
      --output "$1/$2/model" --model $V --loss "$3" --lr "$5" --epochs "$6" --batch-size 4 --grad-accum 2 \
      --max-length 256 --save-every 10 --seed "$4" --no-gradient-checkpointing \
      $( [ -d "$1/$2/model/checkpoint" ] && echo --resume )
}

evaluate() {  # model, name, output: greedy answers to the held-out prompts, judged, against vanilla's
  timed evaluate $PY evaluate.py --input "$HELDOUT" --output "$3" --model "$1" --name "$2" --baseline $V \
      --baseline-name Vanilla "${J[@]}" "${P[@]}" --max-new-tokens 48 --batch-size 40 --judge-concurrency 16
}

for s in $SEEDS; do
  d=$RUN/seed$s
  loop "$d" "$s"
  if [ "$SELF" = 1 ]; then  # the oracle rates every answer the model judged, to say how far they agree
    $PY oracle/study.py answers-as-samples "$d/refined.jsonl" "$d/answers.jsonl"
    timed oracle $PY score.py --input "$d/answers.jsonl" --output "$d/oracle_scored.jsonl" "${J[@]}" "${P[@]}" \
        --judge-concurrency 16
  fi
  # consistency off: under conflicting rules almost no refined answer beats every candidate on both axes.
  # Without denoising (every prompt kept) one pair a prompt, about as many pairs as SPA's two a kept prompt.
  informative="--no-consistency --tau-quantile 0.75"
  pairs "$d" spa "$informative" primary-first 2
  pairs "$d" reverse "$informative" helpfulness-first 2
  pairs "$d" nodenoise "--no-consistency --no-informativeness" primary-first 1
  mkdir -p "$d/simpo" "$d/random" "$d/sft" "$d/spa_lowlr" "$d/random_lowlr"
  cp "$d"/spa/*_pairs.jsonl "$d/simpo/"   # SPA's pairs, trained with w = 1
  for part in train val; do  # the control: SPA's pairs, each order a coin; SFT: the kept prompts' refined answers
    $PY oracle/study.py random-order "$d/spa/${part}_pairs.jsonl" "$d/random/${part}_pairs.jsonl" --seed "$s"
    $PY oracle/study.py sft-pairs "$d/spa/${part}_denoised.jsonl" "$d/sft/${part}_pairs.jsonl"
  done
  cp "$d"/spa/*_pairs.jsonl "$d/spa_lowlr/" && cp "$d"/random/*_pairs.jsonl "$d/random_lowlr/"
  for v in $VARIANTS; do
    case $v in
      simpo) train "$d" "$v" simpo "$s" "$LR" "$EPOCHS" ;;
      sft) train "$d" "$v" sft "$s" "$LR" "$EPOCHS" ;;
      *_lowlr) train "$d" "$v" spa "$s" "$LOW_LR" "$LOW_EPOCHS" ;;
      *) train "$d" "$v" spa "$s" "$LR" "$EPOCHS" ;;
    esac
    evaluate "$d/$v/model" "$v" "$d/$v/eval"
  done
done
mkdir -p "$RUN/summary"
$PY oracle/study.py report "$RUN" --seeds $SEEDS --variants $VARIANTS --heldout "$HELDOUT" --output "$RUN/summary"
[ "$SELF" = 1 ] && $PY oracle/study.py self-agreement "$RUN" --seeds $SEEDS --output "$RUN/summary"
{ for what in "${!spent[@]}"; do echo "$what ${spent[$what]} s"; done; echo "all $((SECONDS - start)) s"; } \
  | tee "$RUN/summary/time.txt"
echo "study: done in $((SECONDS - start)) s; the tables and picture are in $RUN/summary"
