#!/usr/bin/env bash
# The GPU records in one sitting: the kernel tests on the device (Triton and CUDA kernels), the CUDA kernel's
# check and attention grid, the record decode benchmark (attention grid, whole-model decode, correctness check,
# profile) and the host-time probe, all written to OUT_DIR (copy them to benchmarks/ to update the records).
# About 8 minutes on an H100 before the CUDA kernel's part (about 3 more on an H200); split it over two device
# calls if one call's limit is 10 minutes.
# Usage: bash benchmarks/decode_gpu_record.sh OUT_DIR
set -euo pipefail
out=${1:?usage: decode_gpu_record.sh OUT_DIR}
here=$(dirname "$0")
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the benchmarks run from their folder
python3 -m pytest -o addopts="" -p no:cacheprovider -q "$here/../tests/test_kernels.py" \
  "$here/../tests/test_pack_kernel.py" "$here/../tests/test_cuda_decode.py" 2>&1 | tee "$out/kernel-tests.txt" | tail -3
cd "$here"
# The CUDA decode kernel: its check against the torch path and the attention grid against the Triton kernel and sdpa.
python3 cuda_decode_bench.py --json "$out/decode-cuda.json" --markdown "$out/decode-cuda.md" > "$out/decode-cuda-log.txt" 2>&1
tail -40 "$out/decode-cuda.md"
python3 decode_bench.py --check --contexts 4096,32768,131072 --batches 1,8,32 --e2e 32768x8 \
  --profile "$out/decode-e2e-profile-h100.txt" --json "$out/decode-bench.json" --markdown "$out/decode-bench.md" \
  > "$out/decode-bench-log.txt" 2>&1
tail -12 "$out/decode-bench.md"
python3 decode_host.py --context 32768 --batch 8 --markdown "$out/decode-host.md" > "$out/decode-host-log.txt" 2>&1
cat "$out/decode-host.md"
