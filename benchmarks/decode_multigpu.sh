#!/usr/bin/env bash
# The 2-GPU record of issue 19, a phase a device call (each stays under the 10-minute limit of one call):
#   bash benchmarks/decode_multigpu.sh one OUT_DIR         # random Llama-3-8B-shaped model, then the one-GPU rows
#   bash benchmarks/decode_multigpu.sh tp OUT_DIR          # torchrun over the GPUs, tensor parallel
#   bash benchmarks/decode_multigpu.sh device_map OUT_DIR  # layers spread over the GPUs
# Rows go to OUT_DIR/decode-multigpu.json (copy it to benchmarks/). MODEL_DIR (default /tmp/llama3-8b-random)
# holds the model between phases on the same machine; BATCHES the batches timed at 32k (default "8 128 256": 256
# fits 2 tensor-parallel H200s, not one, whose row says so; each compiled row compiles for a minute or two);
# COMMIT the commit, for the rows.
set -euo pipefail
phase=${1:?usage: decode_multigpu.sh one|tp|device_map OUT_DIR}
out=${2:?usage: decode_multigpu.sh one|tp|device_map OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
model=${MODEL_DIR:-/tmp/llama3-8b-random}
cd "$(dirname "$0")"
[ -f "$model/config.json" ] || python3 decode_multigpu.py --make-model "$model"
rows="dynamic-flash@32768x8"
for batch in ${BATCHES:-8 128 256}; do rows="$rows,headq-compiled@32768x$batch"; done
args=(--model "$model" --parallel "$phase" --json "$out/decode-multigpu.json" --check-tokens 64 --rows "$rows")
[ -z "${COMMIT:-}" ] || args+=(--commit "$COMMIT")  # a device copy has no git
if [ "$phase" = tp ]; then
  torchrun --nproc-per-node "$(nvidia-smi -L | wc -l)" decode_multigpu.py "${args[@]}"
else
  python3 decode_multigpu.py "${args[@]}"
fi
