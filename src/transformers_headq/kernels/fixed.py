"""The fused decode kernel over a fixed-capacity cache, as a torch custom op.

``torch.ops.headq.fixed_decode_attention`` takes tensors only: the arena of packed stores over the
whole capacity (with its layout), the one-block window, and the layer's device state (counts of quantized and
window tokens first). Its splits are sized by the capacity, not by the tokens held, so one launch
configuration serves every step and a CUDA graph can replay it; the kernel reads the counts from device memory
(``DEVICE_LENGTHS``) and its warps share the tiles held, however few. (Under
``torch.use_deterministic_algorithms(True)``, as it stands when a graph is captured, tiles are dealt by split
instead and splits past the tokens held write empty partials.) As a custom op it is one opaque node to
``torch.compile``: ``mode="reduce-overhead"`` captures it in the step's CUDA graph. Settings the CUDA kernel
covers (``cuda_decode.fixed_covers``) run it (one launch, its counters in the state);
others run the Triton kernel and its merge.
"""

from __future__ import annotations

import torch

from ..arena import carve
from ..quantize import QuantizedTokens, packed_row_bytes
from . import (
    _OPERAND_DTYPES,
    LAUNCH,
    STATE_COUNTS,
    _bht,
    _smallest_dot_rows,
    _splits,
    cuda_decode,
    split_partials,
    split_stored,
)
from .launch import launch_device


@torch.library.custom_op("headq::fixed_decode_attention", mutates_args=())
def fixed_decode_attention(
    query: torch.Tensor,
    arena: torch.Tensor,
    layout: str,
    window: torch.Tensor,
    validity: torch.Tensor | None,
    state: torch.Tensor,
    scaling: float,
    softcap: float,
    key_bits: int,
    side_bits: int,
    side_per_token: bool,
    value_bits: int,
    rank: int,
    sink_keys: int,
) -> torch.Tensor:
    """Attention output ``[B, 1, Hq, D]`` in the query's dtype (see the module docstring).

    ``arena`` holds, as ``layout`` cuts it (:mod:`..arena`), the key codes, scales and zeros, then the
    side code's if ``rank``, then the values' (``value_bits=0``: dense values, one tensor), then the
    encoder and decoder if ``rank``. ``window``: ``[B, H, block + sink_keys, D + D_v]``, keys then values,
    the last ``sink_keys`` rows holding the exact keys of the first stored slots (read once a block is
    quantized: the kernel checks the device count). ``state``: the layer's device counts of quantized and
    window tokens, its overflow flag, then the CUDA kernel's counters (which it leaves at zero).
    ``rank=0``: no side code; ``softcap=0``: none.
    """
    import triton
    import triton.language as tl

    from .decode import headq_decode_kernel, headq_merge_kernel

    stored = split_stored(carve(arena, layout), 3, 3 if rank else 0, 3 if value_bits else 1)
    key_codes, key_scale, key_zero = stored.keys
    side_codes, side_scale, side_zero = stored.side or stored.keys  # not read without a side code
    value_codes, value_scale, value_zero = stored.values if value_bits else stored.values * 3
    decoder = stored.decoder if stored.decoder is not None else query
    block = window.shape[2] - sink_keys
    window_keys, window_values = window[:, :, :block, : query.shape[-1]], window[:, :, :block, query.shape[-1] :]
    sinks = window[:, :, block:, : query.shape[-1]]

    batch, q_heads, _, head_dim = query.shape
    covered = cuda_decode.fixed_covers(
        query, key_scale, key_bits, side_bits, side_per_token, value_bits, rank, sink_keys, block
    )
    if covered:
        out = cuda_decode.launch(
            query, stored.decoder, QuantizedTokens(*stored.keys), QuantizedTokens(*stored.side) if rank else None,
            QuantizedTokens(*stored.values), window_keys, window_values, sinks if sink_keys else None, validity,
            block, scaling, softcap,
            lengths=state, counters=state[STATE_COUNTS:].view(torch.int32),  # the layer's kernel counters
        )  # fmt: skip
        if out is not None:
            return out
    kv_heads, capacity = key_codes.shape[1], key_codes.shape[2]
    groups = q_heads // kv_heads
    block_g = max(LAUNCH["min_rows"], _smallest_dot_rows(), triton.next_power_of_2(groups))
    side_bytes = packed_row_bytes(rank, side_bits)
    with launch_device(query.device):  # a layer of a split model may live on another GPU
        n_splits, per_split = _splits(batch * kv_heads, capacity, block, query.device)
        rows = batch * kv_heads * n_splits * block_g
        # fresh for each launch: the step's CUDA graph holds them
        m, norm, acc = split_partials(torch.empty(rows * (head_dim + 2), device=query.device), rows, head_dim)
        valid = validity if validity is not None else m
        headq_decode_kernel[(batch * kv_heads, n_splits, 1)](
            query, decoder,
            key_codes, key_scale, key_zero,
            side_codes, side_scale, side_zero,
            value_codes, value_scale, value_zero,
            window_keys, window_values,
            sinks,
            valid, state,
            m, norm, acc,
            0, 0, per_split, scaling, softcap,
            query.stride(0), query.stride(1),
            *_bht(key_codes), *_bht(key_scale),
            side_codes.stride(0), side_codes.stride(1), *_bht(side_scale),
            *_bht(value_codes), *_bht(value_scale),
            *_bht(window_keys), *_bht(window_values),
            valid.stride(0) if validity is not None else 0,
            sink_keys, *_bht(sinks),
            H_KV=kv_heads, G=groups, BLOCK_G=block_g, D=head_dim, R=rank,
            SIDE_BYTES=side_bytes, SIDE_NB=max(16, triton.next_power_of_2(side_bytes)),
            KEY_BITS=key_bits, SIDE_BITS=side_bits, SIDE_PER_TOKEN=side_per_token, VALUE_BITS=value_bits,
            BLOCK_N=block, TILE=min(LAUNCH["tile"], block), HAS_MASK=validity is not None, SOFTCAP=softcap != 0.0,
            OP_DTYPE=getattr(tl, _OPERAND_DTYPES[query.dtype]), ASM=bool(LAUNCH["asm"]) and query.is_cuda,
            DEVICE_LENGTHS=True, HAS_SINKS=sink_keys > 0,
            num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"],
        )  # fmt: skip
        out = torch.empty(batch, 1, q_heads, head_dim, device=query.device, dtype=query.dtype)
        splits_pad = max(2, 1 << (n_splits - 1).bit_length())
        headq_merge_kernel[(batch * kv_heads, groups, 1)](
            m, norm, acc, out, n_splits,
            G=groups, BLOCK_G=block_g, D=head_dim, S_PAD=splits_pad, CHUNK=min(splits_pad, 16),
        )  # fmt: skip
    return out


@fixed_decode_attention.register_fake
def _(query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    batch, q_heads, _, head_dim = query.shape
    return query.new_empty(batch, 1, q_heads, head_dim)
