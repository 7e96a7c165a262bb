"""Fused decode attention over packed HeadQ codes (Triton), flash-decoding style.

One program handles one (sequence, KV head) pair and one split of the quantized tokens, for all
the query heads that share the KV head. Per tile of ``BLOCK_N`` tokens (one quantization block)
it reads the packed 2-bit (or 1/4/8-bit) key codes with the block's per-channel scale and zero,
the packed side codes with their scales, and the packed value codes with their per-token scale
and zero (or dense values), and never writes a dequantized tensor:

    s = (q ⊙ scale_k) · codes_kᵀ + q · zero_k  +  (qW ⊙ scale_c) · codes_cᵀ + qW · zero_c
    acc += p · (codes_v ⊙ scale_v + zero_v)

Score products run as three TF32 passes (``tf32x3``, about float32 accuracy: the two terms of a
logit are large and partly cancel); the value product is plain TF32 on dequantized values.

Each split returns its running max, normaliser and unnormalised output; the caller merges the
splits with the full-precision window in float32 (:func:`merge_partials`). Logits are scaled and
optionally soft-capped as transformers does; padded keys are masked by a per-token validity row.
The torch path in ``attention.py`` stays the oracle: the tests compare the two on the GPU and,
through ``TRITON_INTERPRET=1``, on the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unpack(packed_ptr, rows, row_stride, n_cols: tl.constexpr, n_valid, bits: tl.constexpr, row_mask):
    """Codes ``[len(rows), n_cols]`` (int32, 0 past ``n_valid``) from packed rows, ``8 // bits`` a byte."""
    cols = tl.arange(0, n_cols)
    per_byte: tl.constexpr = 8 // bits
    mask = row_mask[:, None] & (cols < n_valid)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * row_stride + (cols // per_byte)[None, :], mask=mask, other=0)
    shift = ((cols % per_byte) * bits)[None, :]
    return (byte.to(tl.int32) >> shift) & ((1 << bits) - 1)


@triton.jit
def headq_decode_kernel(
    q_ptr,
    qw_ptr,  # [B, Hkv, G, D] and [B, Hkv, G, R] float32
    kc_ptr,
    ks_ptr,
    kz_ptr,  # key codes [B, Hkv, T, D*KB/8], scale/zero [B, Hkv, T/BLOCK_N, D]
    cc_ptr,
    cs_ptr,
    cz_ptr,  # side codes [B, Hkv, T, R*CB/8], scale/zero [B, Hkv, T/BLOCK_N, R] or [.., T, 1]
    vc_ptr,
    vs_ptr,
    vz_ptr,  # value codes [B, Hkv, T, D*VB/8], scale/zero [B, Hkv, T, 1]; or dense values
    valid_ptr,  # [B, T] uint8 key validity (padding), or a dummy when HAS_MASK is false
    m_ptr,
    l_ptr,
    acc_ptr,  # partial results [B, Hkv, S, G], [B, Hkv, S, G], [B, Hkv, S, G, D]
    n_tokens,
    tokens_per_split,
    scaling,
    softcap,
    s_kc_b,
    s_kc_h,
    s_kc_t,
    s_ks_b,
    s_ks_h,
    s_ks_t,
    s_cc_b,
    s_cc_h,
    s_cc_t,
    s_cs_b,
    s_cs_h,
    s_cs_t,
    s_vc_b,
    s_vc_h,
    s_vc_t,
    s_vs_b,
    s_vs_h,
    s_vs_t,
    s_valid_b,
    H_KV: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    KEY_BITS: tl.constexpr,
    SIDE_BITS: tl.constexpr,
    SIDE_PER_TOKEN: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    n_splits = tl.num_programs(1)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_mask = g < G
    q = tl.load(q_ptr + ((pid_bh * G + g[:, None]) * D + d[None, :]), mask=g_mask[:, None], other=0.0)
    if R > 0:  # side-code directions, padded to a power of two >= 16 for the dot products
        rr = tl.arange(0, R_PAD)
        r_mask = rr < R
        qw_ptrs = qw_ptr + ((pid_bh * G + g[:, None]) * R + rr[None, :])
        qw = tl.load(qw_ptrs, mask=g_mask[:, None] & r_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)

    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_tokens)
    for tile in range(start, end, BLOCK_N):
        rows = tile + tl.arange(0, BLOCK_N)
        row_mask = rows < end
        block = tile // BLOCK_N
        # keys: per-channel scale and zero of this block
        kc = _unpack(kc_ptr + b * s_kc_b + h * s_kc_h, rows, s_kc_t, D, D, KEY_BITS, row_mask).to(tl.float32)
        ks = tl.load(ks_ptr + b * s_ks_b + h * s_ks_h + block * s_ks_t + d).to(tl.float32)
        kz = tl.load(kz_ptr + b * s_ks_b + h * s_ks_h + block * s_ks_t + d).to(tl.float32)
        s = tl.dot(q * ks[None, :], tl.trans(kc), input_precision="tf32x3") + tl.sum(q * kz[None, :], axis=1)[:, None]
        if R > 0:
            cc = _unpack(cc_ptr + b * s_cc_b + h * s_cc_h, rows, s_cc_t, R_PAD, R, SIDE_BITS, row_mask).to(tl.float32)
            if SIDE_PER_TOKEN:  # a scale and zero per token over its R entries
                cs = tl.load(cs_ptr + b * s_cs_b + h * s_cs_h + rows * s_cs_t, mask=row_mask, other=0.0).to(tl.float32)
                cz = tl.load(cz_ptr + b * s_cs_b + h * s_cs_h + rows * s_cs_t, mask=row_mask, other=0.0).to(tl.float32)
                s += tl.dot(qw, tl.trans(cc), input_precision="tf32x3") * cs[None, :] + tl.sum(qw, axis=1)[:, None] * cz[None, :]
            else:  # a scale and zero per direction, shared by the block
                cs = tl.load(cs_ptr + b * s_cs_b + h * s_cs_h + block * s_cs_t + rr, mask=r_mask, other=0.0)
                cz = tl.load(cz_ptr + b * s_cs_b + h * s_cs_h + block * s_cs_t + rr, mask=r_mask, other=0.0)
                cs, cz = cs.to(tl.float32), cz.to(tl.float32)
                s += tl.dot(qw * cs[None, :], tl.trans(cc), input_precision="tf32x3") + tl.sum(qw * cz[None, :], axis=1)[:, None]
        s = s * scaling
        if SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
        keep = row_mask
        if HAS_MASK:
            keep = keep & (tl.load(valid_ptr + b * s_valid_b + rows, mask=row_mask, other=0) != 0)
        s = tl.where(keep[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if VALUE_BITS > 0:  # per-token scale and zero over the whole head
            vc = _unpack(vc_ptr + b * s_vc_b + h * s_vc_h, rows, s_vc_t, D, D, VALUE_BITS, row_mask).to(tl.float32)
            vs = tl.load(vs_ptr + b * s_vs_b + h * s_vs_h + rows * s_vs_t, mask=row_mask, other=0.0).to(tl.float32)
            vz = tl.load(vz_ptr + b * s_vs_b + h * s_vs_h + rows * s_vs_t, mask=row_mask, other=0.0).to(tl.float32)
            # dequantize before the product: (p*scale)·codes + p·zero would cancel two large terms
            # (the zero point is about minus the scale times the mid code) and amplify TF32 rounding
            acc += tl.dot(p, vc * vs[:, None] + vz[:, None])
        else:
            v_ptrs = vc_ptr + b * s_vc_b + h * s_vc_h + rows[:, None] * s_vc_t + d[None, :]
            v = tl.load(v_ptrs, mask=row_mask[:, None], other=0.0).to(tl.float32)
            acc += tl.dot(p, v)
        m_i = m_new

    out = (pid_bh * n_splits + split) * BLOCK_G + g
    tl.store(m_ptr + out, m_i, mask=g_mask)
    tl.store(l_ptr + out, l_i, mask=g_mask)
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=g_mask[:, None])
