"""Fused decode attention over packed HeadQ codes (Triton), flash-decoding style.

One program handles one (sequence, KV head) pair and one split of the cached tokens, for all the
query heads that share the KV head. Per tile of ``TILE`` tokens (within one quantization block) it
reads the packed key codes with the block's per-channel scale and zero, the packed side codes with
their scales, and the packed value codes with their per-token scale and zero (or dense values);
nothing dequantized is formed, in memory or in registers. The scales fold into the small operands
instead of the large ones:

    s_t = Σ_d (q_d · scale_d) code_td + Σ_d q_d · zero_d        (keys; likewise qW and side codes)
    acc = Σ_t (p_t · scale_t) code_t  + Σ_t p_t · zero_t       (values)

so each packed byte costs a shift, a mask and a conversion of a small integer, which is exact in
any float type. Codes are packed in planes (``quantize.pack_codes``): plane ``p`` of a row's bytes
holds channels ``p*m ... p*m + m - 1``, so the tile's codes come as ``[planes, TILE, m]`` with no
reshuffling and each product is one batched tensor-core dot over the planes.

Precision: the codes are exact; the folded operands ``q ⊙ scale`` (normalised per query row, so
any model's range fits) and ``p ⊙ scale`` (normalised by the tile's largest scale) are rounded
to float16 (11 significant bits), with float32 accumulation. For float32 models the dots run in
float32 (``tf32x3``). The full-precision window (fewer than ``BLOCK_N`` tokens, read by the last
split) uses the model's dtype, as sdpa does. Logits are scaled and optionally soft-capped as
transformers does; padded keys are masked by a validity row. Each split writes its running max,
normaliser and unnormalised output; :func:`headq_merge_kernel` combines them. The torch path in
``attention.py`` is the oracle: the tests compare the two under ``TRITON_INTERPRET=1`` on CPU, and
``benchmarks/decode_bench.py --check`` on the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _plane_codes(base, rows, row_stride, row_mask, NB: tl.constexpr, n_bytes, BITS: tl.constexpr,
                 DTYPE: tl.constexpr):  # fmt: skip
    """Codes ``[8 // BITS, len(rows), NB]`` of planar-packed rows (bytes past ``n_bytes`` read as 0)."""
    cols = tl.arange(0, NB)
    mask = row_mask[:, None] & (cols < n_bytes)[None, :]
    packed = tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0)
    shifts = (tl.arange(0, 8 // BITS) * BITS).to(tl.uint8)
    return ((packed[None, :, :] >> shifts[:, None, None]) & ((1 << BITS) - 1)).to(DTYPE)


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """Tensor-core product with float32 accumulation; near-float32 precision for float32 models."""
    if FP32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _folded(x, scale, DTYPE: tl.constexpr):
    """``x ⊙ scale`` ``[P, C, G]`` as a dot operand in ``DTYPE``, normalised per row ``g``: (operand, norm)."""
    a = x * scale
    norm = tl.max(tl.max(tl.abs(a), axis=1), axis=0)
    norm = tl.where(norm > 0, norm, 1.0)
    return (a / norm[None, None, :]).to(DTYPE), norm


@triton.jit
def _coded_logits(codes, operand, norm, FP32: tl.constexpr):
    """``[T, G]`` logits of codes ``[P, T, C]`` against a folded operand ``[P, C, G]`` and its row norm."""
    return tl.sum(_dot(codes, operand, FP32), axis=0) * norm[None, :]


@triton.jit
def headq_decode_kernel(
    q_ptr, w_ptr,  # query [B, Hq, 1, D] (strided), decoder W [Hkv, D, R] float32 contiguous
    kc_ptr, ks_ptr, kz_ptr,  # key codes [B, Hkv, T, D*KB/8], scale/zero [B, Hkv, T/BLOCK_N, D]
    cc_ptr, cs_ptr, cz_ptr,  # side codes [B, Hkv, T, ceil(R*CB/8)], scale/zero [.., T/BLOCK_N, R] or [.., T, 1]
    vc_ptr, vs_ptr, vz_ptr,  # value codes [B, Hkv, T, D*VB/8], scale/zero [B, Hkv, T, 1]; or dense values
    wk_ptr, wv_ptr,  # full-precision window keys/values [B, Hkv, W, D]
    valid_ptr,  # [B, T + W] key validity (uint8), when HAS_MASK
    m_ptr, l_ptr, acc_ptr,  # partials [B*Hkv, S, BLOCK_G], [B*Hkv, S, BLOCK_G], [B*Hkv, S, BLOCK_G, D]
    n_tokens, n_window, tokens_per_split, scaling, softcap,
    s_qb, s_qh,
    s_kc_b, s_kc_h, s_kc_t, s_ks_b, s_ks_h, s_ks_t,
    s_cc_b, s_cc_h, s_cc_t, s_cs_b, s_cs_h, s_cs_t,
    s_vc_b, s_vc_h, s_vc_t, s_vs_b, s_vs_h, s_vs_t,
    s_wk_b, s_wk_h, s_wk_t, s_wv_b, s_wv_h, s_wv_t,
    s_valid_b,
    H_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
    R: tl.constexpr, SIDE_BYTES: tl.constexpr, SIDE_NB: tl.constexpr, KEY_BITS: tl.constexpr,
    SIDE_BITS: tl.constexpr, SIDE_PER_TOKEN: tl.constexpr, VALUE_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
    TILE: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, OP_DTYPE: tl.constexpr,
):  # fmt: skip
    FP32: tl.constexpr = OP_DTYPE == tl.float32
    CODE_DTYPE: tl.constexpr = tl.float32 if FP32 else tl.float16  # codes and folded operands
    KP: tl.constexpr = 8 // KEY_BITS  # key planes, KNB channels (bytes) each
    KNB: tl.constexpr = D * KEY_BITS // 8
    VP: tl.constexpr = 1 if VALUE_BITS == 0 else 8 // VALUE_BITS  # dense values: one plane of D
    VNB: tl.constexpr = D if VALUE_BITS == 0 else D * VALUE_BITS // 8

    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid_bh // H_KV
    h = pid_bh % H_KV

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_mask = g < G
    q_rows = q_ptr + b * s_qb + (h * G + g) * s_qh  # [BLOCK_G] row pointers
    k_chan = (tl.arange(0, KP) * KNB)[:, None] + tl.arange(0, KNB)[None, :]  # [KP, KNB]: planar channel
    q_keys = tl.load(q_rows[None, None, :] + k_chan[:, :, None], mask=g_mask[None, None, :], other=0.0)
    q_keys = q_keys.to(tl.float32)  # [KP, KNB, BLOCK_G]
    if R > 0:  # qW in the side code's planar layout: entry (p, j) is direction p * SIDE_BYTES + j
        SP: tl.constexpr = 8 // SIDE_BITS
        i = tl.arange(0, SP * SIDE_NB)
        c_dir = (i // SIDE_NB) * SIDE_BYTES + i % SIDE_NB
        c_ok = (i % SIDE_NB < SIDE_BYTES) & (c_dir < R)
        w = tl.load(w_ptr + h * D * R + c_dir[:, None] + d[None, :] * R, mask=c_ok[:, None], other=0.0)
        q_t = tl.load(q_rows[None, :] + d[:, None], mask=g_mask[None, :], other=0.0).to(tl.float32)
        qw = tl.reshape(tl.dot(w, q_t, input_precision="tf32x3"), [SP, SIDE_NB, BLOCK_G])
        c_dir = tl.reshape(c_dir, [SP, SIDE_NB])
        c_ok = tl.reshape(c_ok, [SP, SIDE_NB])
        if SIDE_PER_TOKEN:  # one scale per token: the operand is qW itself, once per program
            qw_op, qw_norm = _folded(qw, 1.0, CODE_DTYPE)
            qw_sum = tl.sum(tl.sum(qw, axis=1), axis=0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    v_chan = (tl.arange(0, VP) * VNB)[:, None] + tl.arange(0, VNB)[None, :]  # [VP, VNB]
    acc = tl.zeros([VP, BLOCK_G, VNB], tl.float32)  # output channel v_chan[p, j] of row g at [p, g, j]

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
        block = tile // BLOCK_N
        k_scale = tl.load(ks_base + block * s_ks_t + k_chan).to(tl.float32)[:, :, None]
        k_zero = tl.load(kz_base + block * s_ks_t + k_chan).to(tl.float32)[:, :, None]
        k_op, k_norm = _folded(q_keys, k_scale, CODE_DTYPE)
        k_codes = _plane_codes(kc_base, rows, s_kc_t, row_mask, KNB, KNB, KEY_BITS, CODE_DTYPE)
        s_t = _coded_logits(k_codes, k_op, k_norm, FP32) + tl.sum(tl.sum(q_keys * k_zero, axis=1), axis=0)[None, :]
        if R > 0:
            c_codes = _plane_codes(cc_base, rows, s_cc_t, row_mask, SIDE_NB, SIDE_BYTES, SIDE_BITS, CODE_DTYPE)
            if SIDE_PER_TOKEN:  # s += scale_t · (qW · codes_t) + zero_t · Σ qW
                c_scale = tl.load(cs_base + rows * s_cs_t, mask=row_mask, other=0.0).to(tl.float32)
                c_zero = tl.load(cz_base + rows * s_cs_t, mask=row_mask, other=0.0).to(tl.float32)
                s_t += _coded_logits(c_codes, qw_op, qw_norm, FP32) * c_scale[:, None] + c_zero[:, None] * qw_sum[None, :]
            else:  # a scale and zero per direction, shared by the block
                c_scale = tl.load(cs_base + block * s_cs_t + c_dir, mask=c_ok, other=0.0).to(tl.float32)
                c_zero = tl.load(cz_base + block * s_cs_t + c_dir, mask=c_ok, other=0.0).to(tl.float32)
                c_op, c_norm = _folded(qw, c_scale[:, :, None], CODE_DTYPE)
                s_t += _coded_logits(c_codes, c_op, c_norm, FP32) + tl.sum(tl.sum(qw * c_zero[:, :, None], axis=1), axis=0)
        p, alpha, m_i, l_i = _softmax_step(
            tl.trans(s_t), rows, row_mask, m_i, l_i, scaling, softcap, valid_row, HAS_MASK, SOFTCAP
        )
        if VALUE_BITS > 0:  # per-token scale and zero over the whole head
            v_scale = tl.load(vs_base + rows * s_vs_t, mask=row_mask, other=0.0).to(tl.float32)
            v_zero = tl.load(vz_base + rows * s_vs_t, mask=row_mask, other=0.0).to(tl.float32)
            v_max = tl.max(v_scale, axis=0)  # p ⊙ scale normalised by the tile's largest scale
            v_max = tl.where(v_max > 0, v_max, 1.0)
            p_op = (p * (v_scale / v_max)[None, :]).to(CODE_DTYPE)
            v_op = _plane_codes(vc_base, rows, s_vc_t, row_mask, VNB, VNB, VALUE_BITS, CODE_DTYPE)
            bias = tl.sum(p * v_zero[None, :], axis=1)[None, :, None]
        else:
            v_ptrs = vc_base + rows[None, :, None] * s_vc_t + v_chan[:, None, :]
            v_op = tl.load(v_ptrs, mask=row_mask[None, :, None], other=0.0).to(OP_DTYPE)
            p_op = p.to(OP_DTYPE)
            v_max = 1.0
            bias = 0.0
        p_op = tl.broadcast_to(p_op[None, :, :], [VP, BLOCK_G, TILE])
        acc = acc * alpha[None, :, None] + _dot(p_op, v_op, FP32) * v_max + bias

    if split == n_splits - 1:  # the full-precision window: one masked tile of exact keys and values
        w_idx = tl.arange(0, BLOCK_N)
        w_mask = w_idx < n_window
        wk_ptrs = wk_ptr + b * s_wk_b + h * s_wk_h + w_idx[:, None] * s_wk_t + d[None, :]
        wk = tl.load(wk_ptrs, mask=w_mask[:, None], other=0.0).to(OP_DTYPE)
        q = tl.load(q_rows[:, None] + d[None, :], mask=g_mask[:, None], other=0.0).to(OP_DTYPE)
        p, alpha, m_i, l_i = _softmax_step(
            _dot(q, tl.trans(wk), FP32), n_tokens + w_idx, w_mask, m_i, l_i, scaling, softcap, valid_row,
            HAS_MASK, SOFTCAP,
        )  # fmt: skip
        wv_ptrs = wv_ptr + b * s_wv_b + h * s_wv_h + w_idx[None, :, None] * s_wv_t + v_chan[:, None, :]
        wv = tl.load(wv_ptrs, mask=w_mask[None, :, None], other=0.0).to(OP_DTYPE)
        p_op = tl.broadcast_to(p.to(OP_DTYPE)[None, :, :], [VP, BLOCK_G, BLOCK_N])
        acc = acc * alpha[None, :, None] + _dot(p_op, wv, FP32)

    out = (pid_bh * n_splits + split) * BLOCK_G + g
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)
    tl.store(acc_ptr + out[None, :, None] * D + v_chan[:, None, :], acc)


@triton.jit
def _softmax_step(s, slots, slot_mask, m_i, l_i, scaling, softcap, valid_row, HAS_MASK: tl.constexpr,
                  SOFTCAP: tl.constexpr):  # fmt: skip
    """Fold one tile of raw logits ``s [G, N]`` into the running softmax: ``(p, rescale, max, total)``."""
    s = s * scaling
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
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
):  # fmt: skip
    """Combine the splits of one (sequence, KV head): ``out [B, Hq, 1, D]`` float32."""
    pid_bh = tl.program_id(0)
    sp = tl.arange(0, S_PAD)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    s_mask = sp < n_splits
    idx = (pid_bh * n_splits + sp[:, None]) * BLOCK_G + g[None, :]  # [S, G]
    m = tl.load(m_ptr + idx, mask=s_mask[:, None], other=float("-inf"))
    norm = tl.load(l_ptr + idx, mask=s_mask[:, None], other=0.0)
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(m - top[None, :])  # [S, G]
    total = tl.sum(norm * weight, axis=0)  # [G]
    result = tl.zeros([BLOCK_G, D], tl.float32)
    for i in range(0, n_splits):
        part = tl.load(acc_ptr + ((pid_bh * n_splits + i) * BLOCK_G + g[:, None]) * D + d[None, :])
        w_i = tl.sum(tl.where(sp[:, None] == i, weight, 0.0), axis=0)  # [G]
        result += part * w_i[:, None]
    result = result / total[:, None]
    tl.store(out_ptr + (pid_bh * G + g[:, None]) * D + d[None, :], result, mask=(g < G)[:, None])
