"""Quantize-and-pack kernel (Triton) for the cache's ``update``: one pass from states to stored codes.

It computes exactly what :meth:`transformers_headq.quantize.GroupQuantizer.quantize` computes (the torch
oracle), bit for bit: the group's minimum and maximum, the zero point and scale rounded to the metadata
dtype, codes ``round((x - zero) / scale)`` with ties to even, clamped, and the planar packing of
``quantize.pack_codes``. Divisions are IEEE-rounded (``div_rn``) as torch's are, and the rounding to even
is built from ``floor``, which any backend (and the interpreter) has.

Each program handles one (sequence, head) and a tile of ``ROWS`` tokens, loaded in the packed layout
``[ROWS, planes, bytes]``: element ``(p, j)`` is channel ``p * NB + j``, so packing a byte is a sum
over planes of shifted codes, with no reshuffling.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _to_meta(x, META_DTYPE: tl.constexpr):
    """``x`` (float32) rounded to ``META_DTYPE`` to nearest, ties to even, as torch rounds it.

    For bfloat16 the rounding is done on the float32 bits first: Triton's interpreter truncates.
    """
    if META_DTYPE == tl.bfloat16:  # noqa: SIM300 (a constexpr, not a constant)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(META_DTYPE)


@triton.jit
def _codes(x, lo, hi, ok, BITS: tl.constexpr, META_DTYPE: tl.constexpr):
    """Codes (int32, 0 where not ``ok``), scale and zero (``META_DTYPE``) of ``x`` given its groups' range
    ``[lo, hi]`` (broadcastable to ``x``), as ``GroupQuantizer.quantize`` computes them."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    lo = tl.where(lo <= hi, lo, 0.0)  # padding channels or rows (nothing loaded): finite, never stored
    hi = tl.where(lo <= hi, hi, 0.0)
    zero = _to_meta(lo, META_DTYPE)
    scale = _to_meta(tl.math.div_rn(hi - lo, LEVELS * 1.0), META_DTYPE)
    scale_f = scale.to(tl.float32)
    y = tl.math.div_rn(x - zero.to(tl.float32), tl.where(scale_f > 0, scale_f, 1.0))
    nearest = tl.floor(y + 0.5)  # round to nearest, ties to even, as torch.round
    odd = nearest - 2.0 * tl.floor(nearest * 0.5) == 1.0
    nearest = tl.where((nearest - y == 0.5) & odd, nearest - 1.0, nearest)
    codes = tl.where(ok, tl.minimum(tl.maximum(nearest, 0.0), LEVELS * 1.0), 0.0).to(tl.int32)
    return codes, scale, zero


@triton.jit
def quantize_tile(x, ok, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, META_DTYPE: tl.constexpr):
    """Quantize a ``[tokens, channels]`` float32 tile (``ok``: real entries): one group per channel over
    the tile's tokens (``PER_CHANNEL``) or per token over its channels. Returns int32 codes, and scale
    and zero of shape ``[1, channels]`` or ``[tokens, 1]``."""
    if PER_CHANNEL:
        lo = tl.min(tl.where(ok, x, float("inf")), axis=0)[None, :]
        hi = tl.max(tl.where(ok, x, float("-inf")), axis=0)[None, :]
    else:
        lo = tl.min(tl.where(ok, x, float("inf")), axis=1)[:, None]
        hi = tl.max(tl.where(ok, x, float("-inf")), axis=1)[:, None]
    return _codes(x, lo, hi, ok, BITS, META_DTYPE)


@triton.jit
def group_quantize_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr,  # states [BH, T, C]; codes [BH, T, NB]; scale/zero (see below)
    n_rows, s_x_bh, s_x_t, s_c_bh, s_c_t, s_s_bh, s_s_t,
    C: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr,
    PER_CHANNEL: tl.constexpr, META_DTYPE: tl.constexpr,
):  # fmt: skip
    """``PER_CHANNEL``: a scale and zero per channel over the tile (one block of ``ROWS`` tokens), stored at
    ``[BH, T / ROWS, C]``; else a scale and zero per token over its ``C`` channels, stored at ``[BH, T, 1]``."""
    PLANES: tl.constexpr = 8 // BITS
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, NB_PAD)
    chan = tl.arange(0, PLANES)[:, None] * NB + j[None, :]  # [PLANES, NB_PAD]
    chan_ok = (j < NB)[None, :] & (chan < C)
    ok = (rows < n_rows)[:, None, None] & chan_ok[None, :, :]
    x_ptrs = x_ptr + bh * s_x_bh + rows[:, None, None] * s_x_t + chan[None, :, :]
    x = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        lo = tl.min(tl.where(ok, x, float("inf")), axis=0)[None, :, :]
        hi = tl.max(tl.where(ok, x, float("-inf")), axis=0)[None, :, :]
    else:
        lo = tl.min(tl.min(tl.where(ok, x, float("inf")), axis=2), axis=1)[:, None, None]
        hi = tl.max(tl.max(tl.where(ok, x, float("-inf")), axis=2), axis=1)[:, None, None]
    codes, scale, zero = _codes(x, lo, hi, ok, BITS, META_DTYPE)
    packed = tl.sum(codes << (tl.arange(0, PLANES) * BITS)[None, :, None], axis=1)  # bits do not overlap
    row_ok = rows < n_rows
    tl.store(
        codes_ptr + bh * s_c_bh + rows[:, None] * s_c_t + j[None, :], packed.to(tl.uint8),
        mask=row_ok[:, None] & (j < NB)[None, :],
    )  # fmt: skip
    if PER_CHANNEL:
        meta = bh * s_s_bh + tile * s_s_t + chan
        tl.store(scale_ptr + meta, tl.reshape(scale, [PLANES, NB_PAD]), mask=chan_ok)
        tl.store(zero_ptr + meta, tl.reshape(zero, [PLANES, NB_PAD]), mask=chan_ok)
    else:
        meta = bh * s_s_bh + rows * s_s_t
        tl.store(scale_ptr + meta, tl.reshape(scale, [ROWS]), mask=row_ok)
        tl.store(zero_ptr + meta, tl.reshape(zero, [ROWS]), mask=row_ok)
