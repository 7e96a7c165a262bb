"""How fast can a Triton kernel with the decode kernel's grid merely read HeadQ's packed stores? (GPU)

Issue 16 asks the decode kernel for at least half of the H200's bandwidth on the bytes it must read. Before
a new kernel is designed, this probe measures the ceiling of the layout and grid as they are: one program per
(sequence, KV head, split of the tokens), walking ``TILE``-token tiles of the packed key codes, side codes
and value codes with their scales, as ``kernels/decode.py`` does, but only summing the bytes (no conversion,
no products, no softmax). Its time against a device-to-device copy of the same bytes says how much of the
present kernel's time is reading, and which warps/tile/splits let reading reach the bandwidth.

Shapes: Llama-3-8B (8 KV heads, head dim 128), K2 r16 s4 V2 as ``decode_bench.py`` (keys 32 bytes a token and
head, side code 8, values 32, per-block key scales and zeros, per-token value scales and zeros).

    python benchmarks/decode_stream_probe.py --context 32768 --batches 1,8,32 [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from transformers_headq.kernels.codes import dequantized_plane, plane_codes

KV_HEADS, HEAD_DIM, RANK, BLOCK = 8, 128, 16, 64
KEY_BYTES, SIDE_BYTES, VALUE_BYTES = HEAD_DIM * 2 // 8, RANK * 4 // 8, HEAD_DIM * 2 // 8


@triton.jit
def _row_sums(ptr, token, keep, WIDTH: tl.constexpr):
    """Sum of each token's ``WIDTH`` packed bytes (rows ``token`` of a ``[tokens, WIDTH]`` store)."""
    codes = tl.load(ptr + token[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :], mask=keep[:, None], other=0)
    return tl.sum(codes.to(tl.int32), axis=1)


@triton.jit
def stream_kernel(
    kc_ptr, ks_ptr, cc_ptr, cs_ptr, vc_ptr, vs_ptr, out_ptr, n_tokens, tokens_per_split,
    KB: tl.constexpr, SB: tl.constexpr, VB: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
    BLOCK_N: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """Sum every byte (and scale) a decode program reads for one (sequence, KV head) and split."""
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_tokens)
    rows = tl.arange(0, TILE)
    total = tl.zeros([TILE], tl.int32)
    scales = tl.zeros([D], tl.float32)
    side = tl.zeros([2 * R], tl.float32)
    for tile in range(start, end, TILE):
        t = tile + rows
        keep = t < end
        token = bh * n_tokens + t
        total += _row_sums(kc_ptr, token, keep, KB) + _row_sums(cc_ptr, token, keep, SB)
        total += _row_sums(vc_ptr, token, keep, VB)
        for sub in tl.static_range(TILE // BLOCK_N):  # scale and zero rows of each block in the tile
            block_row = (bh * (n_tokens // BLOCK_N) + tile // BLOCK_N + sub) * 2
            scales += tl.load(ks_ptr + block_row * D + tl.arange(0, D)).to(tl.float32)
            scales += tl.load(ks_ptr + (block_row + 1) * D + tl.arange(0, D)).to(tl.float32)
            side += tl.load(cs_ptr + block_row * R + tl.arange(0, 2 * R)).to(tl.float32)
        value_scale = tl.load(vs_ptr + (bh * n_tokens + t) * 2, mask=keep, other=0.0).to(tl.float32)
        value_zero = tl.load(vs_ptr + (bh * n_tokens + t) * 2 + 1, mask=keep, other=0.0).to(tl.float32)
        total += (value_scale + value_zero).to(tl.int32)
    tl.store(out_ptr + bh * tl.num_programs(1) + split, tl.sum(total) + (tl.sum(scales) + tl.sum(side)).to(tl.int32))


@triton.jit
def _key_products(kb, ks_ptr, block_row, q, PLANE: tl.constexpr, D: tl.constexpr, KB: tl.constexpr,
                  ASM: tl.constexpr):  # fmt: skip
    """``[TILE, G]`` products of one key plane, dequantized with its block's scales, with a query plane."""
    chan = PLANE * KB + tl.arange(0, KB)
    scale = tl.load(ks_ptr + block_row * D + chan)[None, :]
    zero = tl.load(ks_ptr + (block_row + 1) * D + chan)[None, :]
    return tl.dot(dequantized_plane(kb, scale, zero, PLANE, 2, tl.float16, ASM), q)


@triton.jit
def products_kernel(
    kc_ptr, ks_ptr, cc_ptr, cs_ptr, vc_ptr, vs_ptr, out_ptr, n_tokens, tokens_per_split,
    KB: tl.constexpr, SB: tl.constexpr, VB: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
    BLOCK_N: tl.constexpr, TILE: tl.constexpr, G: tl.constexpr, PARTS: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """The stream kernel's reads plus the decode kernel's code conversions and tensor-core products, no softmax:
    ``PARTS`` 1: keys (dequantized per plane, against a query of ``G`` rows), 2: and values (codes against
    fixed probabilities), 3: and the side code. Blocks of ``BLOCK_N`` = ``TILE`` tokens (one scale row a tile)."""
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_tokens)
    rows = tl.arange(0, TILE)
    q = tl.full([KB, G], 0.01, tl.float16)
    p = tl.full([G, TILE], 0.01, tl.float16)
    s_total = tl.zeros([TILE, G], tl.float32)
    acc = tl.zeros([G, VB], tl.float32)
    for tile in range(start, end, TILE):
        t = tile + rows
        keep = t < end
        token = bh * n_tokens + t
        kb = tl.load(kc_ptr + token[:, None] * KB + tl.arange(0, KB)[None, :], mask=keep[:, None], other=0)
        side_bytes = tl.arange(0, 16)  # a product needs 16 columns: the side code's 8 bytes, padded
        cb = tl.load(
            cc_ptr + token[:, None] * SB + side_bytes[None, :], mask=keep[:, None] & (side_bytes < SB)[None, :], other=0
        )
        vb = tl.load(vc_ptr + token[:, None] * VB + tl.arange(0, VB)[None, :], mask=keep[:, None], other=0)
        block_row = (bh * (n_tokens // BLOCK_N) + tile // BLOCK_N) * 2
        for plane in tl.static_range(4):
            s_total += _key_products(kb, ks_ptr, block_row, q, plane, D, KB, ASM)
        if PARTS >= 2:
            for plane in tl.static_range(4):
                acc = tl.dot(p, plane_codes(vb, plane, 2, tl.float16, ASM), acc)
        else:
            acc += tl.sum(vb.to(tl.float32), axis=0)[None, :]
        if PARTS >= 3:
            q_side = tl.full([16, G], 0.01, tl.float16)
            for plane in tl.static_range(2):
                s_total += tl.dot(plane_codes(cb, plane, 4, tl.float16, ASM), q_side)
        else:
            s_total += tl.sum(cb.to(tl.float32), axis=1)[:, None]
        value_scale = tl.load(vs_ptr + token * 2, mask=keep, other=0.0).to(tl.float32)
        side = tl.load(cs_ptr + block_row * R + tl.arange(0, 2 * R)).to(tl.float32)
        s_total += value_scale[:, None] + tl.sum(side)
    tl.store(out_ptr + bh * tl.num_programs(1) + split, tl.sum(s_total) + tl.sum(acc))


def stores(batch: int, context: int) -> tuple[list[torch.Tensor], int]:
    """Random packed stores of one layer, laid out as the decode kernel reads them, and their bytes."""
    bh, blocks = batch * KV_HEADS, context // BLOCK

    def codes(width: int) -> torch.Tensor:
        return torch.randint(0, 256, (bh, context, width), dtype=torch.uint8, device="cuda")

    tensors = [
        codes(KEY_BYTES),
        torch.rand(bh, blocks, 2, HEAD_DIM, device="cuda", dtype=torch.float16),
        codes(SIDE_BYTES),
        torch.rand(bh, blocks, 2, RANK, device="cuda", dtype=torch.float16),
        codes(VALUE_BYTES),
        torch.rand(bh, context, 2, device="cuda", dtype=torch.float16),
    ]
    return tensors, sum(t.numel() * t.element_size() for t in tensors)


def time_ms(fn, warmup: int = 10, reps: int = 50) -> float:  # type: ignore[no-untyped-def]
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=reps))


def splits_of(batch_heads: int, context: int, tile: int, programs_per_sm: int) -> tuple[int, int]:
    """``(splits, tokens per split)`` aiming at ``programs_per_sm`` programs per SM, whole tiles a split."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = max(1, min(context // tile, -(-programs_per_sm * sms // batch_heads)))
    per_split = -(-context // splits // tile) * tile
    return -(-context // per_split), per_split


def probe(tensors: list[torch.Tensor], context: int, programs_per_sm: int, tile: int, warps: int, stages: int) -> float:
    """Time of one read of ``tensors`` (the stores of :func:`stores`) with this launch setting, in ms."""
    bh = tensors[0].shape[0]
    splits, per_split = splits_of(bh, context, tile, programs_per_sm)
    out = torch.empty(bh * splits, dtype=torch.int32, device="cuda")

    def launch() -> None:
        stream_kernel[(bh, splits)](
            *tensors, out, context, per_split, KEY_BYTES, SIDE_BYTES, VALUE_BYTES, HEAD_DIM, RANK, BLOCK, tile,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    return time_ms(launch)


def products_ms(tensors: list[torch.Tensor], context: int, parts: int, warps: int, programs_per_sm: int) -> float:
    """Time of :func:`products_kernel` (tiles of 64 tokens, 3 stages) over ``tensors``, in ms."""
    bh = tensors[0].shape[0]
    splits, per_split = splits_of(bh, context, BLOCK, programs_per_sm)
    out = torch.empty(bh * splits, dtype=torch.float32, device="cuda")

    def launch() -> None:
        products_kernel[(bh, splits)](
            *tensors, out, context, per_split, KEY_BYTES, SIDE_BYTES, VALUE_BYTES, HEAD_DIM, RANK, BLOCK, BLOCK, 8,
            parts, True, num_warps=warps, num_stages=3,
        )  # fmt: skip

    return time_ms(launch)


def copy_bandwidth(nbytes: int) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes`` (it reads and writes them)."""
    flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return 2 * nbytes / time_ms(flat.clone) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        tensors, nbytes = stores(batch, args.context)
        copy_bw = copy_bandwidth(nbytes)
        print(f"batch {batch}, {args.context} tokens: {nbytes / 1e6:.1f} MB; copy {copy_bw / 1e9:.0f} GB/s", flush=True)
        mine = []
        for warps, tile, programs_per_sm, stages in itertools.product((1, 2, 4, 8), (64, 128), (4, 16, 64), (2, 3, 4)):
            ms = probe(tensors, args.context, programs_per_sm, tile, warps, stages)
            mine.append(
                dict(
                    batch=batch, context=args.context, warps=warps, tile=tile, stages=stages,
                    programs_per_sm=programs_per_sm, ms=ms, bytes=nbytes, gb_s=nbytes / ms / 1e6,
                    of_copy=nbytes / ms * 1e3 / copy_bw, gpu=torch.cuda.get_device_name(),
                )
            )  # fmt: skip
        rows += mine
        for warps in (1, 2, 4, 8):
            best = min((r for r in mine if r["warps"] == warps), key=lambda r: r["ms"])
            print(
                f"  {warps} warps: {best['ms']:.4f} ms, {best['gb_s']:.0f} GB/s ({best['of_copy']:.0%} of a copy), "
                f"tile {best['tile']}, stages {best['stages']}, programs/SM {best['programs_per_sm']}",
                flush=True,
            )
        for parts, name in ((1, "keys"), (2, "keys+values"), (3, "keys+values+side")):
            for warps, programs_per_sm in itertools.product((1, 2, 4), (16, 64)):
                ms = products_ms(tensors, args.context, parts, warps, programs_per_sm)
                print(f"  read + convert + products of {name}, {warps} warps, {programs_per_sm} programs/SM: "
                      f"{ms:.4f} ms", flush=True)  # fmt: skip
                rows.append(dict(batch=batch, context=args.context, parts=name, warps=warps, ms=ms,
                                 programs_per_sm=programs_per_sm, gpu=torch.cuda.get_device_name()))  # fmt: skip
        del tensors
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
