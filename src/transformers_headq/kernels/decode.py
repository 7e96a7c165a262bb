"""Fused decode attention over packed HeadQ codes (Triton), flash-decoding style.

One program handles one (sequence, KV head) pair and one split of the cached tokens, for all the
query heads that share the KV head. Per tile of ``BLOCK_N`` tokens (one quantization block) it
reads the packed key codes with the block's per-channel scale and zero, the packed side codes with
their scales, and the packed value codes with their per-token scale and zero (or dense values);
nothing dequantized is ever written to memory:

    s = q · (codes_k ⊙ scale_k + zero_k)ᵀ  +  qW · (codes_c ⊙ scale_c + zero_c)ᵀ
    acc += p · (codes_v ⊙ scale_v + zero_v)

``qW`` is computed in the program from the decoder ``W``. The last split also reads the
full-precision window (fewer than ``BLOCK_N`` tokens, exact keys and values). Each split writes its
running max, normaliser and unnormalised output; :func:`headq_merge_kernel` combines them.

Packed rows are loaded as whole bytes (coalesced) and expanded in registers. Keys, side codes and
values are dequantized in registers before their products (``(q ⊙ scale)·codes + q·zero`` would
cancel two large terms and amplify rounding), and the products take their operands in the model's
dtype (bf16/fp16 tensor cores, as sdpa does; float32 for float32 models) with float32 accumulation; tiles of
``TILE`` tokens keep the registers in bounds (see ``benchmarks/kernel_tuning.py``). Logits are
scaled and optionally soft-capped as transformers does; padded keys are masked by a validity row.
The torch path in ``attention.py`` is the oracle: the tests compare the two under
``TRITON_INTERPRET=1`` on CPU, and ``benchmarks/decode_bench.py --check`` on the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _codes(row_ptr, rows, row_stride, row_mask, N_BYTES: tl.constexpr, n_bytes, BITS: tl.constexpr):
    """Codes ``[len(rows), N_BYTES * 8 // BITS]`` (float32) of packed rows, low bits first.

    Whole bytes are loaded once (coalesced) and expanded in registers by shifts and a reshape.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    cols = tl.arange(0, N_BYTES)
    mask = row_mask[:, None] & (cols < n_bytes)[None, :]
    packed = tl.load(row_ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0)
    shifts = (tl.arange(0, PER_BYTE) * BITS).to(tl.uint8)
    codes = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, [rows.shape[0], N_BYTES * PER_BYTE]).to(tl.float32)


@triton.jit
def headq_decode_kernel(
    q_ptr, w_ptr,  # query [B, Hq, 1, D] (strided), decoder W [Hkv, D, R] float32 contiguous
    kc_ptr, ks_ptr, kz_ptr,  # key codes [B, Hkv, T, D*KB/8], scale/zero [B, Hkv, T/BLOCK_N, D]
    cc_ptr, cs_ptr, cz_ptr,  # side codes [B, Hkv, T, R*CB/8], scale/zero [.., T/BLOCK_N, R] or [.., T, 1]
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
    R: tl.constexpr, R_PAD: tl.constexpr, KEY_BITS: tl.constexpr, SIDE_BITS: tl.constexpr,
    SIDE_PER_TOKEN: tl.constexpr, VALUE_BITS: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, OP_DTYPE: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid_bh // H_KV
    h = pid_bh % H_KV

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_mask = g < G
    q = tl.load(q_ptr + b * s_qb + (h * G + g[:, None]) * s_qh + d[None, :], mask=g_mask[:, None], other=0.0)
    q = q.to(tl.float32)
    q_op = q.to(OP_DTYPE)  # operands in the model's precision, as sdpa uses them; fp32 accumulation
    q_t = tl.trans(q_op)
    if R > 0:  # qW: the query in the side-code directions, directions padded to R_PAD >= 16
        rr = tl.arange(0, R_PAD)
        r_mask = rr < R
        w = tl.load(w_ptr + h * D * R + d[:, None] * R + rr[None, :], mask=r_mask[None, :], other=0.0)
        qw = tl.dot(q, w, input_precision="tf32x3")
        qw_t = tl.trans(qw.to(OP_DTYPE))

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)

    kc_base = kc_ptr + b * s_kc_b + h * s_kc_h
    ks_base = ks_ptr + b * s_ks_b + h * s_ks_h
    kz_base = kz_ptr + b * s_ks_b + h * s_ks_h
    cc_base = cc_ptr + b * s_cc_b + h * s_cc_h
    cs_base = cs_ptr + b * s_cs_b + h * s_cs_h
    cz_base = cz_ptr + b * s_cs_b + h * s_cs_h
    vc_base = vc_ptr + b * s_vc_b + h * s_vc_h
    vs_base = vs_ptr + b * s_vs_b + h * s_vs_h
    vz_base = vz_ptr + b * s_vs_b + h * s_vs_h
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_tokens)
    for tile in range(start, end, TILE):  # TILE divides BLOCK_N: one scale row of keys per tile
        rows = tile + tl.arange(0, TILE)
        row_mask = rows < end
        block = tile // BLOCK_N
        kc = _codes(kc_base, rows, s_kc_t, row_mask, D * KEY_BITS // 8, D * KEY_BITS // 8, KEY_BITS)
        ks = tl.load(ks_base + block * s_ks_t + d).to(tl.float32)
        kz = tl.load(kz_base + block * s_ks_t + d).to(tl.float32)
        k_hat = (kc * ks[None, :] + kz[None, :]).to(OP_DTYPE)  # dequantized first: nothing cancels
        # keys as the left operand: no transpose of the tile, only of the small [TILE, G] result
        s_t = tl.dot(k_hat, q_t)
        if R > 0:
            cc = _codes(cc_base, rows, s_cc_t, row_mask, R_PAD * SIDE_BITS // 8, R * SIDE_BITS // 8, SIDE_BITS)
            if SIDE_PER_TOKEN:  # a scale and zero per token over its R entries
                cs = tl.load(cs_base + rows * s_cs_t, mask=row_mask, other=0.0).to(tl.float32)
                cz = tl.load(cz_base + rows * s_cs_t, mask=row_mask, other=0.0).to(tl.float32)
                c_hat = (cc * cs[:, None] + cz[:, None]).to(OP_DTYPE)
            else:  # a scale and zero per direction, shared by the block
                cs = tl.load(cs_base + block * s_cs_t + rr, mask=r_mask, other=0.0).to(tl.float32)
                cz = tl.load(cz_base + block * s_cs_t + rr, mask=r_mask, other=0.0).to(tl.float32)
                c_hat = (cc * cs[None, :] + cz[None, :]).to(OP_DTYPE)
            s_t += tl.dot(c_hat, qw_t)
        s = tl.trans(s_t)
        if VALUE_BITS > 0:  # per-token scale and zero over the whole head
            vc = _codes(vc_base, rows, s_vc_t, row_mask, D * VALUE_BITS // 8, D * VALUE_BITS // 8, VALUE_BITS)
            vs = tl.load(vs_base + rows * s_vs_t, mask=row_mask, other=0.0).to(tl.float32)
            vz = tl.load(vz_base + rows * s_vs_t, mask=row_mask, other=0.0).to(tl.float32)
            v = (vc * vs[:, None] + vz[:, None]).to(OP_DTYPE)
        else:
            v = tl.load(vc_base + rows[:, None] * s_vc_t + d[None, :], mask=row_mask[:, None], other=0.0)
            v = v.to(OP_DTYPE)
        m_i, l_i, acc = _online_softmax(
            s, v, rows, row_mask, m_i, l_i, acc, scaling, softcap, valid_ptr + b * s_valid_b, HAS_MASK, SOFTCAP
        )

    if split == n_splits - 1:  # the full-precision window: one masked tile of exact keys and values
        w_idx = tl.arange(0, BLOCK_N)
        w_mask = w_idx < n_window
        wk_ptrs = wk_ptr + b * s_wk_b + h * s_wk_h + w_idx[:, None] * s_wk_t + d[None, :]
        wv_ptrs = wv_ptr + b * s_wv_b + h * s_wv_h + w_idx[:, None] * s_wv_t + d[None, :]
        wk = tl.load(wk_ptrs, mask=w_mask[:, None], other=0.0)
        wv = tl.load(wv_ptrs, mask=w_mask[:, None], other=0.0)
        s = tl.dot(q_op, tl.trans(wk.to(OP_DTYPE)))
        m_i, l_i, acc = _online_softmax(
            s, wv.to(OP_DTYPE), n_tokens + w_idx, w_mask, m_i, l_i, acc, scaling, softcap,
            valid_ptr + b * s_valid_b, HAS_MASK, SOFTCAP,
        )  # fmt: skip

    out = (pid_bh * n_splits + split) * BLOCK_G + g
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc)


@triton.jit
def _online_softmax(s, v, slots, slot_mask, m_i, l_i, acc, scaling, softcap, valid_row, HAS_MASK: tl.constexpr,
                    SOFTCAP: tl.constexpr):  # fmt: skip
    """Fold one tile of raw logits ``s [G, N]`` and values ``v [N, D]`` into the running softmax."""
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
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


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
