"""One grid point of the CUDA decode kernel, launched a few times for a profiler to watch (Nsight Compute).

The kernel alone, as ``cuda_decode_bench.py`` times it (Llama-3-8B shapes, the library's default HeadQ settings,
random states); profile the third launch, when the extension is built and the buffers exist:

    cd benchmarks && ncu --clock-control none --kernel-name regex:decode_kernel --launch-skip 2 \\
        --launch-count 1 --set full --import-source yes -o decode-32k-x8 \\
        python cuda_decode_profile.py --context 32768 --batch 8
"""

from __future__ import annotations

import argparse
import json

import torch
from decode_bench import HEAD_DIM, HEADQ, Q_HEADS, fill_headq_layer, random_basis

from transformers_headq import HeadQCache
from transformers_headq.fused_decode import fused_decode_attention
from transformers_headq.kernels import cuda_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sinks", type=int, default=HEADQ.sink_keys, help="exact sink keys (the default's)")
    parser.add_argument("--launches", type=int, default=4)
    parser.add_argument("--launch", help="CUDA kernel launch settings as JSON (cuda_decode.LAUNCH keys)")
    args = parser.parse_args()
    if args.launch:
        cuda_decode.LAUNCH.update(json.loads(args.launch))
    config = HEADQ.replace(sink_keys=args.sinks)
    layer = HeadQCache(random_basis(config.rank or 0), config).layers[0]
    fill_headq_layer(layer, args.batch, args.context)
    q = torch.randn(args.batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    for _ in range(args.launches):
        out = fused_decode_attention(layer, q, None, HEAD_DIM**-0.5, None)
        assert out is not None
    torch.cuda.synchronize()
    print(f"{args.launches} launches at {args.context} x {args.batch}, launch settings {cuda_decode.LAUNCH}")


if __name__ == "__main__":
    main()
