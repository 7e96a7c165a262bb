"""Encode whole blocks of keys and values in one kernel (Triton): key codes, side code, value codes.

One program takes one (sequence, KV head) and one block of ``BLOCK`` tokens and does in registers
what the torch path does in a dozen launches: the keys' group quantization, their dequantization in
the model dtype, the error ``k - k̂`` projected on the encoder ``U`` (``[D, R]``, a tensor-core product
in IEEE float32), the side code's quantization, the values' quantization, and the planar packing
of all three (the layout of ``quantize.pack_codes``). Quantization follows ``GroupQuantizer``
bit for bit (see ``pack.py``); the side code's float32 sums run in another order than torch's
einsum, so its codes can differ from the torch path's where a value sits on a rounding boundary.
That is why a GPU cache encodes every block through this kernel, eager or compiled: the two hold
the same bits.

Two ways to place the result:
- fresh outputs (``HAS_TARGET=False``): block ``program_id(1)`` of the input lands in block
  ``program_id(1)`` of the outputs (the growing cache's flush, any number of blocks);
- a fixed-capacity store (``HAS_TARGET=True``): the one input block (the full window) lands in
  block ``target[0]`` of the store, and only if ``commit[0]`` is set; otherwise the program exits at
  once. A compiled decode step launches it every step; it costs a flag load except when the window
  has just filled.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pack import _to_meta, quantize_tile


@triton.jit
def _store_quantized(
    x, ok, codes_ptr, scale_ptr, zero_ptr, row0, meta_row0, s_c_t, s_s_t,
    BLOCK: tl.constexpr, C_PAD: tl.constexpr, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    META_DTYPE: tl.constexpr,
):  # fmt: skip
    """Quantize the tile ``x`` ``[BLOCK, C_PAD]`` (``ok``: real entries), pack it, store codes at rows
    ``row0 + t`` and scales/zeros at metadata row ``meta_row0`` (per channel) or ``row0 + t`` (per token)."""
    PLANES: tl.constexpr = 8 // BITS
    NB: tl.constexpr = C_PAD // PLANES
    codes, scale, zero = quantize_tile(x, ok, BITS, PER_CHANNEL, META_DTYPE)
    packed = tl.sum(tl.reshape(codes, [BLOCK, PLANES, NB]) << (tl.arange(0, PLANES) * BITS)[None, :, None], axis=1)
    t = tl.arange(0, BLOCK)
    j = tl.arange(0, NB)
    tl.store(codes_ptr + (row0 + t)[:, None] * s_c_t + j[None, :], packed.to(tl.uint8))
    c = tl.arange(0, C_PAD)
    if PER_CHANNEL:
        c_ok = tl.max(ok.to(tl.int32), axis=0) > 0
        tl.store(scale_ptr + meta_row0 * s_s_t + c, tl.reshape(scale, [C_PAD]), mask=c_ok)
        tl.store(zero_ptr + meta_row0 * s_s_t + c, tl.reshape(zero, [C_PAD]), mask=c_ok)
    else:
        tl.store(scale_ptr + (row0 + t) * s_s_t, tl.reshape(scale, [BLOCK]))
        tl.store(zero_ptr + (row0 + t) * s_s_t, tl.reshape(zero, [BLOCK]))
    return codes, scale, zero


@triton.jit
def encode_block_kernel(
    k_ptr, v_ptr, enc_ptr, target_ptr, commit_ptr,
    kc_ptr, ks_ptr, kz_ptr, sc_ptr, ss_ptr, sz_ptr, vc_ptr, vs_ptr, vz_ptr,
    s_k_bh, s_k_t, s_v_bh, s_v_t, s_e_h, s_e_d, s_e_r,
    s_kc_bh, s_kc_t, s_ks_bh, s_ks_t,
    s_sc_bh, s_sc_t, s_ss_bh, s_ss_t,
    s_vc_bh, s_vc_t, s_vs_bh, s_vs_t,
    H: tl.constexpr, D: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, R_DOT: tl.constexpr,
    BLOCK: tl.constexpr, KEY_BITS: tl.constexpr, KEY_PER_CHANNEL: tl.constexpr,
    SIDE_BITS: tl.constexpr, SIDE_PER_CHANNEL: tl.constexpr,
    VALUE_BITS: tl.constexpr, VALUE_PER_CHANNEL: tl.constexpr,
    MODEL_DTYPE: tl.constexpr, META_DTYPE: tl.constexpr, HAS_TARGET: tl.constexpr,
):  # fmt: skip
    """Keys ``[BH, T, D]`` and values (model dtype) to packed codes; see the module docstring.

    ``R == 0``: no side code. ``SIDE_BITS == 0``: the side code is stored dense (model dtype) in ``sc``.
    ``VALUE_BITS == 0``: values are copied dense into ``vc``. ``R_PAD``: the side code's packed width in
    codes (``R`` rounded up to whole bytes); ``R_DOT``: at least 16 columns for the tensor-core product.
    """
    if HAS_TARGET:  # noqa: SIM102 (a constexpr test around a runtime one: Triton compiles them apart)
        if tl.load(commit_ptr) == 0:
            return
    bh = tl.program_id(0)
    block = tl.load(target_ptr) if HAS_TARGET else tl.program_id(1)
    src = 0 if HAS_TARGET else tl.program_id(1) * BLOCK  # first input token of this program's block
    row0 = block * BLOCK
    t = tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    k = tl.load(k_ptr + bh * s_k_bh + (src + t)[:, None] * s_k_t + d[None, :]).to(tl.float32)
    all_d = (t[:, None] >= 0) & (d[None, :] >= 0)
    codes, scale, zero = _store_quantized(
        k, all_d, kc_ptr + bh * s_kc_bh, ks_ptr + bh * s_ks_bh, kz_ptr + bh * s_ks_bh, row0, block, s_kc_t, s_ks_t,
        BLOCK, D, KEY_BITS, KEY_PER_CHANNEL, META_DTYPE,
    )  # fmt: skip
    if R > 0:
        # k̂ as the cache stores it: codes * scale + zero in float32 (no fused multiply-add: the launch
        # turns fp fusion off), rounded to the model dtype, as GroupQuantizer.dequantize(..., dtype).
        key_hat = _to_meta(codes.to(tl.float32) * scale.to(tl.float32) + zero.to(tl.float32), MODEL_DTYPE)
        error = k - key_hat.to(tl.float32)
        h = bh % H
        r = tl.arange(0, R_DOT)
        enc_ptrs = enc_ptr + h * s_e_h + d[:, None] * s_e_d + r[None, :] * s_e_r
        enc = tl.load(enc_ptrs, mask=(r < R)[None, :], other=0.0)
        side = tl.dot(error, enc, input_precision="ieee")  # [BLOCK, R_DOT]
        if R_DOT > R_PAD:  # columns from R on are zero: fold them away to the packed width
            side = tl.sum(tl.reshape(side, [BLOCK, R_DOT // R_PAD, R_PAD]), axis=1)
        rp = tl.arange(0, R_PAD)
        if SIDE_BITS == 0:
            out = sc_ptr + bh * s_sc_bh + (row0 + t)[:, None] * s_sc_t + rp[None, :]
            tl.store(out, _to_meta(side, MODEL_DTYPE), mask=(rp < R)[None, :])  # rounded as torch rounds
        else:
            _store_quantized(
                side, (t[:, None] >= 0) & (rp < R)[None, :], sc_ptr + bh * s_sc_bh, ss_ptr + bh * s_ss_bh,
                sz_ptr + bh * s_ss_bh, row0, block, s_sc_t, s_ss_t, BLOCK, R_PAD, SIDE_BITS, SIDE_PER_CHANNEL,
                META_DTYPE,
            )  # fmt: skip
    v = tl.load(v_ptr + bh * s_v_bh + (src + t)[:, None] * s_v_t + d[None, :])
    if VALUE_BITS == 0:
        tl.store(vc_ptr + bh * s_vc_bh + (row0 + t)[:, None] * s_vc_t + d[None, :], v)
    else:
        _store_quantized(
            v.to(tl.float32), all_d, vc_ptr + bh * s_vc_bh, vs_ptr + bh * s_vs_bh, vz_ptr + bh * s_vs_bh, row0,
            block, s_vc_t, s_vs_t, BLOCK, D, VALUE_BITS, VALUE_PER_CHANNEL, META_DTYPE,
        )  # fmt: skip
