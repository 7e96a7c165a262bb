"""Fused decode attention over packed HeadQ codes (Triton), flash-decoding style.

One program handles one (sequence, KV head) pair and one split of the cached tokens, for all the
query heads that share the KV head. Per tile of ``TILE`` tokens (within one quantization block) it
reads the packed key codes with the block's per-channel scale and zero, the packed side codes with
their scales, and the packed value codes with their per-token scale and zero (or dense values);
nothing dequantized is written to memory.

Codes are packed in planes (``quantize.pack_codes``): plane ``p`` of a row's ``m`` bytes holds
channels ``p*m ... p*m + m - 1``, so each plane of a tile's bytes ``[TILE, m]`` is one tensor-core
product in channel order, and the bytes go from shared memory straight into the operand layout:

    s   = Σ_planes (code ⊙ scale + zero)_plane · q_plane          keys, and block-scaled side codes
                                                                   against qW: dequantized in registers
    acc = Σ_t (p_t · scale_t) · code_t + Σ_t p_t · zero_t         values: per-token scale folded into p

On the GPU codes become float16 by bit operations (``codes.py``: no integer-to-float
conversions); plain codes come as float16 subnormals (``code * 2**-24``, exact; the float32 sums
are scaled back).

Precision: codes are exact; dequantized keys and side codes, the query and ``qW`` (divided by a
per-row norm, multiplied back into the logits' scaling) and ``p ⊙ scale`` (divided by the largest
value scale so far) are float16 operands (11 significant bits), accumulated in float32. Keys must lie
within float16's range (|k| < 65504), as their default float16 scales and zeros already require. For
float32 models the products run in float32 (``tf32x3``). The full-precision window (fewer than
``BLOCK_N`` tokens, read by the last split) and the exact sink keys (the first stored slots, read by the
first split after its loop; ``HAS_SINKS``) use the model's dtype, as sdpa does. Logits are scaled
and optionally soft-capped as transformers does; padded keys are masked by a validity row. Each split
writes its running max, normaliser and unnormalised output for the real query rows;
:func:`headq_merge_kernel` combines them. With ``DEVICE_LENGTHS`` (a fixed-capacity cache, a CUDA
graph replaying the launch) the token and window counts are read from device memory, and splits
past the quantized tokens write empty partials that the merge weighs by zero. The torch path in
``attention.py`` is the oracle: the tests
compare the two under ``TRITON_INTERPRET=1`` on CPU, and ``benchmarks/decode_bench.py --check`` on the
GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .codes import code_unit, dequantized_plane, plane_codes


@triton.jit
def _dot(a, b, acc, FP32: tl.constexpr):
    """``acc + a @ b`` on tensor cores in float32; near-float32 precision for float32 models."""
    if FP32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _query_plane(q_rows, g_mask, norm, PLANE: tl.constexpr, NB: tl.constexpr, DTYPE: tl.constexpr):
    """Query channels ``PLANE*NB ... PLANE*NB + NB - 1`` over ``norm``, ``[NB, G]`` in ``DTYPE``."""
    chan = PLANE * NB + tl.arange(0, NB)
    q = tl.load(q_rows[None, :] + chan[:, None], mask=g_mask[None, :], other=0.0).to(tl.float32)
    return (q / norm[None, :]).to(DTYPE)


@triton.jit
def _side_query_plane(w_head, q_t, PLANE: tl.constexpr, NB: tl.constexpr, n_bytes: tl.constexpr, R: tl.constexpr,
                      D: tl.constexpr):  # fmt: skip
    """``qW`` ``[NB, G]`` (float32) for the directions of one side-code plane, their indices and validity."""
    j = tl.arange(0, NB)
    direction = PLANE * n_bytes + j
    ok = (j < n_bytes) & (direction < R)
    d = tl.arange(0, D)
    w = tl.load(w_head + direction[:, None] + d[None, :] * R, mask=ok[:, None], other=0.0)
    return tl.dot(w, q_t, input_precision="tf32x3"), direction, ok


@triton.jit
def _key_plane(codes, ks_row, kz_row, PLANE: tl.constexpr, NB: tl.constexpr, BITS: tl.constexpr, DTYPE: tl.constexpr,
               FAST: tl.constexpr):  # fmt: skip
    """Dequantized keys ``[T, NB]`` of one plane of a tile's packed bytes, with its block's channel scales."""
    chan = PLANE * NB + tl.arange(0, NB)
    return dequantized_plane(codes, tl.load(ks_row + chan)[None, :], tl.load(kz_row + chan)[None, :], PLANE, BITS,
                             DTYPE, FAST)  # fmt: skip


@triton.jit
def _side_plane(codes, cs_row, cz_row, direction, ok, PLANE: tl.constexpr, BITS: tl.constexpr, DTYPE: tl.constexpr,
                FAST: tl.constexpr):  # fmt: skip
    """Dequantized block-scaled side codes ``[T, NB]`` of one plane, with their per-direction scales."""
    scale = tl.load(cs_row + direction, mask=ok, other=0.0)[None, :]
    zero = tl.load(cz_row + direction, mask=ok, other=0.0)[None, :]
    return dequantized_plane(codes, scale, zero, PLANE, BITS, DTYPE, FAST)


@triton.jit
def _window_plane(rows, row_mask, PLANE: tl.constexpr, NB: tl.constexpr, DTYPE: tl.constexpr):
    """Exact window values of channels ``PLANE*NB ...``, ``[N, NB]``."""
    chan = PLANE * NB + tl.arange(0, NB)
    return tl.load(rows + chan[None, :], mask=row_mask[:, None], other=0.0).to(DTYPE)


@triton.jit(
    do_not_specialize=["n_tokens", "n_window", "tokens_per_split", "s_wk_b", "s_wk_h", "s_wv_b", "s_wv_h", "n_sinks"]
)
def headq_decode_kernel(
    q_ptr, w_ptr,  # query [B, Hq, 1, D] (strided), decoder W [Hkv, D, R] float32 contiguous
    kc_ptr, ks_ptr, kz_ptr,  # key codes [B, Hkv, T, D*KB/8], scale/zero [B, Hkv, T/BLOCK_N, D]
    cc_ptr, cs_ptr, cz_ptr,  # side codes [B, Hkv, T, SIDE_BYTES], scale/zero [.., T/BLOCK_N, R] or [.., T, 1]
    vc_ptr, vs_ptr, vz_ptr,  # value codes [B, Hkv, T, D*VB/8], scale/zero [B, Hkv, T, 1]; or dense values
    wk_ptr, wv_ptr,  # full-precision window keys/values [B, Hkv, W, D]
    sk_ptr,  # exact sink keys [B, Hkv, n_sinks, D] of the first stored slots, when HAS_SINKS
    valid_ptr,  # [B, T + W] key validity (uint8), when HAS_MASK
    lengths_ptr,  # [2] int64: quantized tokens and window tokens, when DEVICE_LENGTHS (else not read)
    m_ptr, l_ptr, acc_ptr,  # partials [B*Hkv, S, BLOCK_G], [B*Hkv, S, BLOCK_G], [B*Hkv, S, BLOCK_G, D]
    n_tokens, n_window, tokens_per_split, scaling, softcap,
    s_qb, s_qh,
    s_kc_b, s_kc_h, s_kc_t, s_ks_b, s_ks_h, s_ks_t,
    s_cc_b, s_cc_h, s_cs_b, s_cs_h, s_cs_t,
    s_vc_b, s_vc_h, s_vc_t, s_vs_b, s_vs_h, s_vs_t,
    s_wk_b, s_wk_h, s_wk_t, s_wv_b, s_wv_h, s_wv_t,
    s_valid_b,
    n_sinks, s_sk_b, s_sk_h, s_sk_t,
    H_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
    R: tl.constexpr, SIDE_BYTES: tl.constexpr, SIDE_NB: tl.constexpr, KEY_BITS: tl.constexpr,
    SIDE_BITS: tl.constexpr, SIDE_PER_TOKEN: tl.constexpr, VALUE_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
    TILE: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, OP_DTYPE: tl.constexpr,
    ASM: tl.constexpr, DEVICE_LENGTHS: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
    SINK_TILE: tl.constexpr = 16  # sink slots a step (the fewest rows a product takes)
    FP32: tl.constexpr = OP_DTYPE == tl.float32  # noqa: SIM300 (a constexpr, not a constant)
    CODE_DTYPE: tl.constexpr = tl.float32 if FP32 else tl.float16  # dequantized keys, codes, folded p
    FAST: tl.constexpr = ASM and not FP32
    KP: tl.constexpr = 8 // KEY_BITS  # key planes (at most 4), KNB channels (bytes) each
    KNB: tl.constexpr = D * KEY_BITS // 8
    VP: tl.constexpr = 1 if VALUE_BITS == 0 else 8 // VALUE_BITS  # dense values: one plane of D
    VNB: tl.constexpr = D if VALUE_BITS == 0 else D * VALUE_BITS // 8
    SP: tl.constexpr = 8 // SIDE_BITS

    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    if DEVICE_LENGTHS:  # a fixed-capacity cache: splits cover the capacity, lengths come from the device
        n_tokens = tl.load(lengths_ptr).to(tl.int32)
        n_window = tl.load(lengths_ptr + 1).to(tl.int32)
    b = pid_bh // H_KV
    h = pid_bh % H_KV

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_mask = g < G
    q_rows = q_ptr + b * s_qb + (h * G + g) * s_qh  # [BLOCK_G] row pointers
    # Query operands are divided by a per-row norm (so that float16 holds any range), multiplied back
    # into the logits' scaling.
    q_t = tl.load(q_rows[None, :] + d[:, None], mask=g_mask[None, :], other=0.0).to(tl.float32)  # [D, G]
    norm = tl.max(tl.abs(q_t), axis=0)
    if R > 0:  # qW per side-code plane: entry j of plane p is direction p * SIDE_BYTES + j
        w_head = w_ptr + h * D * R
        qw0, c_dir0, c_ok0 = _side_query_plane(w_head, q_t, 0, SIDE_NB, SIDE_BYTES, R, D)
        norm = tl.maximum(norm, tl.max(tl.abs(qw0), axis=0))
        if SP > 1:
            qw1, c_dir1, c_ok1 = _side_query_plane(w_head, q_t, 1, SIDE_NB, SIDE_BYTES, R, D)
            norm = tl.maximum(norm, tl.max(tl.abs(qw1), axis=0))
        if SP > 2:
            qw2, c_dir2, c_ok2 = _side_query_plane(w_head, q_t, 2, SIDE_NB, SIDE_BYTES, R, D)
            qw3, c_dir3, c_ok3 = _side_query_plane(w_head, q_t, 3, SIDE_NB, SIDE_BYTES, R, D)
            norm = tl.maximum(norm, tl.maximum(tl.max(tl.abs(qw2), axis=0), tl.max(tl.abs(qw3), axis=0)))
    norm = tl.where(norm > 0, norm, 1.0)
    kj = tl.arange(0, KNB)
    q0 = _query_plane(q_rows, g_mask, norm, 0, KNB, CODE_DTYPE)
    if KP > 1:
        q1 = _query_plane(q_rows, g_mask, norm, 1, KNB, CODE_DTYPE)
    if KP > 2:
        q2 = _query_plane(q_rows, g_mask, norm, 2, KNB, CODE_DTYPE)
        q3 = _query_plane(q_rows, g_mask, norm, 3, KNB, CODE_DTYPE)
    if R > 0:
        qw_sum = tl.sum(qw0, axis=0) / norm
        qw0 = (qw0 / norm[None, :]).to(CODE_DTYPE)
        if SP > 1:
            qw_sum += tl.sum(qw1, axis=0) / norm
            qw1 = (qw1 / norm[None, :]).to(CODE_DTYPE)
        if SP > 2:
            qw_sum += (tl.sum(qw2, axis=0) + tl.sum(qw3, axis=0)) / norm
            qw2 = (qw2 / norm[None, :]).to(CODE_DTYPE)
            qw3 = (qw3 / norm[None, :]).to(CODE_DTYPE)
    row_scaling = scaling * norm

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    vj = tl.arange(0, VNB)
    # Quantized values accumulate Σ (p ⊙ scale / v_norm) · codes (times the code unit) in acc<p> (output
    # channels p * VNB + j)
    # and Σ p ⊙ zero in v_bias; v_norm is the largest value scale so far (float16 holds p ⊙ scale / v_norm).
    acc0 = tl.zeros([BLOCK_G, VNB], tl.float32)
    acc1 = tl.zeros([BLOCK_G, VNB], tl.float32)
    acc2 = tl.zeros([BLOCK_G, VNB], tl.float32)
    acc3 = tl.zeros([BLOCK_G, VNB], tl.float32)
    v_bias = tl.zeros([BLOCK_G], tl.float32)
    v_norm = 1e-30

    kc_base = kc_ptr + b * s_kc_b + h * s_kc_h
    ks_base = ks_ptr + b * s_ks_b + h * s_ks_h
    kz_base = kz_ptr + b * s_ks_b + h * s_ks_h
    cc_base = cc_ptr + b * s_cc_b + h * s_cc_h
    cs_base = cs_ptr + b * s_cs_b + h * s_cs_h
    cz_base = cz_ptr + b * s_cs_b + h * s_cs_h
    vc_base = vc_ptr + b * s_vc_b + h * s_vc_h
    vs_base = vs_ptr + b * s_vs_b + h * s_vs_h
    vz_base = vz_ptr + b * s_vs_b + h * s_vs_h
    valid_row = valid_ptr + b * s_valid_b
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_tokens)
    for tile in range(start, end, TILE):  # TILE divides BLOCK_N: one scale row of keys per tile
        rows = tile + tl.arange(0, TILE)
        row_mask = rows < end
        if HAS_SINKS:  # sink slots are read after the loop
            row_mask = row_mask & (rows >= n_sinks)
        ks_row = ks_base + (tile // BLOCK_N) * s_ks_t
        kz_row = kz_base + (tile // BLOCK_N) * s_ks_t
        kb = tl.load(kc_base + rows[:, None] * s_kc_t + kj[None, :], mask=row_mask[:, None], other=0)
        s_t = tl.zeros([TILE, BLOCK_G], tl.float32)  # keys dequantized per plane, against the fixed query
        s_t = _dot(_key_plane(kb, ks_row, kz_row, 0, KNB, KEY_BITS, CODE_DTYPE, FAST), q0, s_t, FP32)
        if KP > 1:
            s_t = _dot(_key_plane(kb, ks_row, kz_row, 1, KNB, KEY_BITS, CODE_DTYPE, FAST), q1, s_t, FP32)
        if KP > 2:
            s_t = _dot(_key_plane(kb, ks_row, kz_row, 2, KNB, KEY_BITS, CODE_DTYPE, FAST), q2, s_t, FP32)
            s_t = _dot(_key_plane(kb, ks_row, kz_row, 3, KNB, KEY_BITS, CODE_DTYPE, FAST), q3, s_t, FP32)
        if R > 0:
            cj = tl.arange(0, SIDE_NB)
            c_mask = row_mask[:, None] & (cj < SIDE_BYTES)[None, :]
            cb = tl.load(cc_base + rows[:, None] * SIDE_BYTES + cj[None, :], mask=c_mask, other=0)
            if SIDE_PER_TOKEN:  # s += scale_t · (qW · codes_t) + zero_t · Σ qW
                s_c = tl.zeros([TILE, BLOCK_G], tl.float32)
                s_c = _dot(plane_codes(cb, 0, SIDE_BITS, CODE_DTYPE, FAST), qw0, s_c, FP32)
                if SP > 1:
                    s_c = _dot(plane_codes(cb, 1, SIDE_BITS, CODE_DTYPE, FAST), qw1, s_c, FP32)
                if SP > 2:
                    s_c = _dot(plane_codes(cb, 2, SIDE_BITS, CODE_DTYPE, FAST), qw2, s_c, FP32)
                    s_c = _dot(plane_codes(cb, 3, SIDE_BITS, CODE_DTYPE, FAST), qw3, s_c, FP32)
                c_scale = tl.load(cs_base + rows * s_cs_t, mask=row_mask, other=0.0).to(tl.float32)
                c_zero = tl.load(cz_base + rows * s_cs_t, mask=row_mask, other=0.0).to(tl.float32)
                s_t += s_c * (c_scale / code_unit(FAST))[:, None] + c_zero[:, None] * qw_sum[None, :]
            else:  # a scale and zero per direction, shared by the block: dequantized like the keys
                cs_row = cs_base + (tile // BLOCK_N) * s_cs_t
                cz_row = cz_base + (tile // BLOCK_N) * s_cs_t
                s_t = _dot(_side_plane(cb, cs_row, cz_row, c_dir0, c_ok0, 0, SIDE_BITS, CODE_DTYPE, FAST), qw0, s_t,
                           FP32)  # fmt: skip
                if SP > 1:
                    s_t = _dot(_side_plane(cb, cs_row, cz_row, c_dir1, c_ok1, 1, SIDE_BITS, CODE_DTYPE, FAST), qw1,
                               s_t, FP32)  # fmt: skip
                if SP > 2:
                    s_t = _dot(_side_plane(cb, cs_row, cz_row, c_dir2, c_ok2, 2, SIDE_BITS, CODE_DTYPE, FAST), qw2,
                               s_t, FP32)  # fmt: skip
                    s_t = _dot(_side_plane(cb, cs_row, cz_row, c_dir3, c_ok3, 3, SIDE_BITS, CODE_DTYPE, FAST), qw3,
                               s_t, FP32)  # fmt: skip
        p, alpha, m_i, l_i = _softmax_step(
            tl.trans(s_t), rows, row_mask, m_i, l_i, row_scaling, softcap, valid_row, HAS_MASK, SOFTCAP
        )
        acc0, acc1, acc2, acc3, v_bias, v_norm = _read_values(
            p, alpha, rows, row_mask, acc0, acc1, acc2, acc3, v_bias, v_norm, vc_base, vs_base, vz_base, s_vc_t,
            s_vs_t, vj, VALUE_BITS, VP, CODE_DTYPE, OP_DTYPE, FP32, FAST,
        )  # fmt: skip

    if HAS_SINKS:  # noqa: SIM102 (a constexpr branch: without sinks its names do not exist)
        # The sink slots, masked out of the loop above, with their exact keys (no side code) and stored values.
        # Here, after the loop, so that nothing of theirs is live in it (registers: the loop has none to spare).
        if start < n_sinks:  # in small tiles and the model's dtype, as the window: few registers here too
            q = tl.load(q_rows[None, :] + d[:, None], mask=g_mask[None, :], other=0.0).to(OP_DTYPE)  # [D, G]
            sk_base = sk_ptr + b * s_sk_b + h * s_sk_h
            for first in range(0, n_sinks, SINK_TILE):
                rows = first + tl.arange(0, SINK_TILE)
                row_mask = (rows < n_sinks) & (rows < n_tokens)  # a fixed-capacity cache: once block 0 is stored
                k_exact = tl.load(sk_base + rows[:, None] * s_sk_t + d[None, :], mask=row_mask[:, None], other=0.0)
                s_t = _dot(k_exact.to(OP_DTYPE), q, tl.zeros([SINK_TILE, BLOCK_G], tl.float32), FP32)
                p, alpha, m_i, l_i = _softmax_step(
                    tl.trans(s_t), rows, row_mask, m_i, l_i, tl.full([BLOCK_G], scaling, tl.float32), softcap,
                    valid_row, HAS_MASK, SOFTCAP,
                )  # fmt: skip
                acc0, acc1, acc2, acc3, v_bias, v_norm = _read_values(
                    p, alpha, rows, row_mask, acc0, acc1, acc2, acc3, v_bias, v_norm, vc_base, vs_base, vz_base,
                    s_vc_t, s_vs_t, vj, VALUE_BITS, VP, CODE_DTYPE, OP_DTYPE, FP32, FAST,
                )  # fmt: skip

    if VALUE_BITS > 0:  # back to plain sums of p ⊙ value
        v_norm = v_norm / code_unit(FAST)
        acc0 = acc0 * v_norm + v_bias[:, None]
        acc1 = acc1 * v_norm + v_bias[:, None]
        acc2 = acc2 * v_norm + v_bias[:, None]
        acc3 = acc3 * v_norm + v_bias[:, None]

    if split == n_splits - 1:  # the full-precision window: one masked tile of exact keys and values
        w_idx = tl.arange(0, BLOCK_N)
        w_mask = w_idx < n_window
        wk_ptrs = wk_ptr + b * s_wk_b + h * s_wk_h + w_idx[:, None] * s_wk_t + d[None, :]
        wk = tl.load(wk_ptrs, mask=w_mask[:, None], other=0.0).to(OP_DTYPE)
        q = tl.load(q_rows[:, None] + d[None, :], mask=g_mask[:, None], other=0.0).to(OP_DTYPE)
        logits = _dot(q, tl.trans(wk), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), FP32)
        p, alpha, m_i, l_i = _softmax_step(
            logits, n_tokens + w_idx, w_mask, m_i, l_i, tl.full([BLOCK_G], scaling, tl.float32), softcap, valid_row,
            HAS_MASK, SOFTCAP,
        )  # fmt: skip
        p = p.to(OP_DTYPE)
        wv_rows = wv_ptr + b * s_wv_b + h * s_wv_h + w_idx[:, None] * s_wv_t
        acc0 = _dot(p, _window_plane(wv_rows, w_mask, 0, VNB, OP_DTYPE), acc0 * alpha[:, None], FP32)
        if VP > 1:
            acc1 = _dot(p, _window_plane(wv_rows, w_mask, 1, VNB, OP_DTYPE), acc1 * alpha[:, None], FP32)
        if VP > 2:
            acc2 = _dot(p, _window_plane(wv_rows, w_mask, 2, VNB, OP_DTYPE), acc2 * alpha[:, None], FP32)
            acc3 = _dot(p, _window_plane(wv_rows, w_mask, 3, VNB, OP_DTYPE), acc3 * alpha[:, None], FP32)

    out = (pid_bh * n_splits + split) * BLOCK_G + g  # partials of the real query rows only
    tl.store(m_ptr + out, m_i, mask=g_mask)
    tl.store(l_ptr + out, l_i, mask=g_mask)
    acc_rows = acc_ptr + out[:, None] * D + vj[None, :]
    tl.store(acc_rows, acc0, mask=g_mask[:, None])
    if VP > 1:
        tl.store(acc_rows + VNB, acc1, mask=g_mask[:, None])
    if VP > 2:
        tl.store(acc_rows + 2 * VNB, acc2, mask=g_mask[:, None])
        tl.store(acc_rows + 3 * VNB, acc3, mask=g_mask[:, None])


@triton.jit
def _read_values(p, alpha, rows, row_mask, acc0, acc1, acc2, acc3, v_bias, v_norm, vc_base, vs_base, vz_base, s_vc_t,
                 s_vs_t, vj, VALUE_BITS: tl.constexpr, VP: tl.constexpr, CODE_DTYPE: tl.constexpr,
                 OP_DTYPE: tl.constexpr, FP32: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
    """Fold one tile's values, weighted by ``p [G, N]``, into the accumulators (rescaled by ``alpha``).

    Quantized values: per-token scale and zero over the whole head, folded into ``p`` (see the kernel's
    docstring); dense values: one product."""
    if VALUE_BITS > 0:
        v_scale = tl.load(vs_base + rows * s_vs_t, mask=row_mask, other=0.0).to(tl.float32)
        v_zero = tl.load(vz_base + rows * s_vs_t, mask=row_mask, other=0.0).to(tl.float32)
        new_norm = tl.maximum(v_norm, tl.max(v_scale, axis=0))
        rescale = alpha * (v_norm / new_norm)
        v_norm = new_norm
        v_bias = v_bias * alpha + tl.sum(p * v_zero[None, :], axis=1)
        p_op = (p * (v_scale / v_norm)[None, :]).to(CODE_DTYPE)
        vb = tl.load(vc_base + rows[:, None] * s_vc_t + vj[None, :], mask=row_mask[:, None], other=0)
        acc0 = _dot(p_op, plane_codes(vb, 0, VALUE_BITS, CODE_DTYPE, FAST), acc0 * rescale[:, None], FP32)
        if VP > 1:
            acc1 = _dot(p_op, plane_codes(vb, 1, VALUE_BITS, CODE_DTYPE, FAST), acc1 * rescale[:, None], FP32)
        if VP > 2:
            acc2 = _dot(p_op, plane_codes(vb, 2, VALUE_BITS, CODE_DTYPE, FAST), acc2 * rescale[:, None], FP32)
            acc3 = _dot(p_op, plane_codes(vb, 3, VALUE_BITS, CODE_DTYPE, FAST), acc3 * rescale[:, None], FP32)
    else:
        v = tl.load(vc_base + rows[:, None] * s_vc_t + vj[None, :], mask=row_mask[:, None], other=0.0)
        acc0 = _dot(p.to(OP_DTYPE), v.to(OP_DTYPE), acc0 * alpha[:, None], FP32)
    return acc0, acc1, acc2, acc3, v_bias, v_norm


@triton.jit
def _softmax_step(s, slots, slot_mask, m_i, l_i, row_scaling, softcap, valid_row, HAS_MASK: tl.constexpr,
                  SOFTCAP: tl.constexpr):  # fmt: skip
    """Fold one tile of raw logits ``s [G, N]`` into the running softmax: ``(p, rescale, max, total)``."""
    s = s * row_scaling[:, None]
    if SOFTCAP:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
    keep = slot_mask
    if HAS_MASK:
        keep = keep & (tl.load(valid_row + slots, mask=slot_mask, other=0) != 0)
    s = tl.where(keep[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def headq_merge_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, n_splits,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Combine the splits of one query row of one (sequence, KV head) into ``out [B, 1, Hq, D]``, in its dtype.

    One program a query row, not a KV head: at batch 1 a long cache has a hundred splits or more for only
    a few KV heads, and one program a KV head left most of the GPU idle while it walked them. The splits'
    outputs are read ``CHUNK`` at a time.
    """
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)  # a real query row: < G
    sp = tl.arange(0, S_PAD)
    d = tl.arange(0, D)
    first_row = pid_bh * n_splits * BLOCK_G + row  # partials of split s: first_row + s * BLOCK_G
    m = tl.load(m_ptr + first_row + sp * BLOCK_G, mask=sp < n_splits, other=float("-inf"))
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.load(l_ptr + first_row + sp * BLOCK_G, mask=sp < n_splits, other=0.0) * tl.exp(m - top))
    c = tl.arange(0, CHUNK)
    result = tl.zeros([D], tl.float32)
    for first in range(0, n_splits, CHUNK):
        here = (first + c) < n_splits
        rows = first_row + (first + c) * BLOCK_G
        weight = tl.exp(tl.load(m_ptr + rows, mask=here, other=float("-inf")) - top)
        acc = tl.load(acc_ptr + rows[:, None] * D + d[None, :], mask=here[:, None], other=0.0)
        result += tl.sum(acc * weight[:, None], axis=0)
    result = (result / total).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (pid_bh * G + row) * D + d, result)
