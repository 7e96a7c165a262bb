"""Time the HeadQ split kernel at one shape under several launch settings; print registers and spills.

python benchmarks/kernel_tuning.py --context 32768 --batch 8
"""

from __future__ import annotations

import argparse

import torch
from decode_bench import HEAD_DIM, HEADQ, KV_HEADS, Q_HEADS, bench, fill_headq_layer, random_basis  # noqa: I001

import transformers_headq.kernels as kernels
from transformers_headq import HeadQCache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", default="", help="several batch sizes, ',' separated (overrides --batch)")
    args = parser.parse_args()
    for batch in [int(b) for b in args.batches.split(",") if b] or [args.batch]:
        sweep(args.context, batch)


def sweep(context: int, batch: int) -> None:
    layer = HeadQCache(random_basis(HEADQ.rank or 0), HEADQ).layers[0]
    fill_headq_layer(layer, batch, context)
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    read = layer.key_nbytes() + layer.value_nbytes()
    print(f"context {context} batch {batch}: {read / 1e6:.1f} MB to read; {KV_HEADS} KV heads")
    grid = [(32, 2, 3, n) for n in (4, 8, 16, 32, 64)] + [(64, 4, 3, n) for n in (4, 8, 16, 32)]
    for tile, warps, stages, per_sm in grid:
        kernels.LAUNCH.update(num_warps=warps, num_stages=stages, tile=tile, programs_per_sm=per_sm)
        try:
            ms = bench(lambda: kernels.fused_decode_attention(layer, q, None, HEAD_DIM**-0.5, None))
        except Exception as err:  # a setting that does not compile or fit
            print(f"tile {tile} warps {warps} programs/SM {per_sm}: {type(err).__name__}: {err}")
            continue
        k = kernels.last_compiled
        print(
            f"tile {tile} warps {warps} programs/SM {per_sm}: {ms:.3f} ms, "
            f"{read / ms / 1e6:.0f} GB/s, "
            f"regs {k.n_regs}, spills {k.n_spills}, shared {k.metadata.shared}"
        )


if __name__ == "__main__":
    main()
