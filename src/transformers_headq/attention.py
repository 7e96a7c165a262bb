"""The ``headq`` attention function: logits corrected by the side code, read from packed codes.

For a quantized token the logit is ``(q·k̂ + (qW)·ĉ) · scaling``; for a window token it is the
exact ``q·k · scaling``. ``qW`` is computed once per query, so the correction costs ``r``
multiply-adds per cached token. The reference path below is pure torch, walks the cache in
chunks with an online softmax (memory stays bounded at long context), and, when the layer tracks
it, accumulates ``Σ p²`` per cached token for the A² value policy. It takes transformers' sdpa
mask format (a boolean ``[B, 1 or H, Q, K]`` mask, or ``None`` for plain causal attention).

A token quantized during this very call (a block that filled inside a prefill) is seen quantized
only by queries at or after the block's last slot, and exactly by earlier ones: that is what a
token-by-token decode would have shown each query, so one forward over a sequence gives the same
outputs as decoding it token by token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .effective_sdpa import can_use_effective_sdpa, effective_sdpa_attention
from .handoff import AttentionInputs, HeadQStates
from .layer import HeadQLayer
from .static import StaticDecodeStates
from .static_attention import static_decode_attention

ATTENTION_NAME = "headq"
# Multi-token calls go through sdpa over effective keys where they can (effective_sdpa.py); the
# reference below stays the oracle that tests hold that path to.
PREFILL_BY_SDPA = True
# Memory the A² passes of one layer's call may keep scores in (see _computed_once).
SCORE_MEMO_BYTES = 1 << 30


@dataclass
class _Chunk:
    """A run of cached slots ``[start, end)``: how to score it and how to read its values."""

    start: int
    end: int
    logits: Callable[[], torch.Tensor]  # unscaled q·k, [B, H, R, n] float32
    readout: Callable[[torch.Tensor], torch.Tensor]  # probabilities [B, H, R, n] -> [B, H, R, Dv]


def _quantized_chunk(
    inputs: AttentionInputs[HeadQLayer],
    qg: torch.Tensor,
    q_side: torch.Tensor | None,
    row_slots: torch.Tensor,
    start: int,
    end: int,
) -> _Chunk:
    layer = inputs.layer

    def exact_mask() -> torch.Tensor | None:
        """[R, n] True where a row must see a fresh token's exact state (block not yet complete)."""
        lo = max(start, inputs.fresh_start)
        if inputs.fresh_keys is None or lo >= end:
            return None
        block = layer.config.block_size
        slots = torch.arange(start, end, device=qg.device)
        block_end = (slots // block + 1) * block - 1
        fresh = slots >= inputs.fresh_start
        return fresh[None, :] & (row_slots[:, None] < block_end[None, :])

    use_exact = exact_mask()
    fresh_lo = max(start, inputs.fresh_start) - inputs.fresh_start
    fresh_hi = end - inputs.fresh_start
    offset = max(start, inputs.fresh_start) - start

    def logits() -> torch.Tensor:
        key_hat, side = layer.read_keys(start, end)
        s = qg @ key_hat.transpose(-1, -2)
        if side is not None:
            assert q_side is not None
            s = s + q_side @ side.transpose(-1, -2)
        if use_exact is not None:
            assert inputs.fresh_keys is not None
            exact = qg @ inputs.fresh_keys[:, :, fresh_lo:fresh_hi].float().transpose(-1, -2)
            s[..., offset:] = torch.where(use_exact[:, offset:], exact, s[..., offset:])
        return s

    def readout(p: torch.Tensor) -> torch.Tensor:
        v_hat = layer.read_values(start, end)
        out = p @ v_hat
        if use_exact is not None:
            assert inputs.fresh_values is not None
            delta = inputs.fresh_values[:, :, fresh_lo:fresh_hi].float() - v_hat[:, :, offset:]
            out = out + (p[..., offset:] * use_exact[:, offset:]) @ delta
        return out

    return _Chunk(start, end, logits, readout)


def _dense_chunk(qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> _Chunk:
    return _Chunk(
        start,
        start + keys.shape[-2],
        lambda: qg @ keys.float().transpose(-1, -2),
        lambda p: p @ values.float(),
    )


def _grouped_mask(mask: torch.Tensor, heads: int, groups: int, q_len: int) -> torch.Tensor:
    """``[B, 1 or H*g, Q, K]`` mask to the grouped-row layout ``[B, 1 or H, g*Q, K]``."""
    batch, mask_heads, _, kv = mask.shape
    if mask_heads == 1:
        return mask.unsqueeze(2).expand(batch, 1, groups, q_len, kv).reshape(batch, 1, groups * q_len, kv)
    return mask.reshape(batch, heads, groups * q_len, kv)


Scorer = Callable[[_Chunk], torch.Tensor]


def _scorer(mask: torch.Tensor | None, row_slots: torch.Tensor, scaling: float, softcap: float | None) -> Scorer:
    """Scaled, soft-capped, masked logits of a chunk, ``[B, H, R, n]``."""

    def scores(chunk: _Chunk) -> torch.Tensor:
        s = chunk.logits() * scaling
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if mask is None:
            slots = torch.arange(chunk.start, chunk.end, device=s.device)
            return s.masked_fill(slots[None, :] > row_slots[:, None], float("-inf"))
        part = mask[..., chunk.start : chunk.end]
        if part.dtype == torch.bool:
            return s.masked_fill(~part, float("-inf"))
        return s + part.float()

    return scores


@dataclass
class _Softmax:
    """Per-row softmax statistics over all chunks: ``p = exp(s - max) / total``."""

    max: torch.Tensor
    total: torch.Tensor

    def probabilities(self, s: torch.Tensor) -> torch.Tensor:
        safe_max = torch.where(torch.isinf(self.max), torch.zeros_like(self.max), self.max)
        norm = torch.where(self.total > 0, self.total, torch.ones_like(self.total))
        return torch.exp(s - safe_max) / norm


def _attend(qg: torch.Tensor, chunks: list[_Chunk], scores: Scorer) -> tuple[torch.Tensor, _Softmax]:
    """Online-softmax attention of grouped query rows ``qg`` [B, H, R, D] over ``chunks``."""
    batch, heads, rows, _ = qg.shape
    running_max = qg.new_full((batch, heads, rows, 1), float("-inf"))
    total = qg.new_zeros((batch, heads, rows, 1))
    acc: torch.Tensor | None = None
    for chunk in chunks:
        s = scores(chunk)
        new_max = torch.maximum(running_max, s.amax(-1, keepdim=True))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        rescale = torch.exp(running_max - safe_max)
        p = torch.exp(s - safe_max)
        total = total * rescale + p.sum(-1, keepdim=True)
        part = chunk.readout(p)
        acc = part if acc is None else acc * rescale + part
        running_max = new_max
    assert acc is not None
    return acc / torch.where(total > 0, total, torch.ones_like(total)), _Softmax(running_max, total)


@torch.no_grad()
def _softmax_stats(qg: torch.Tensor, chunks: list[_Chunk], scores: Scorer) -> _Softmax:
    """The softmax statistics alone (a logits-only pass, for choices needed before any readout)."""
    batch, heads, rows, _ = qg.shape
    running_max = qg.new_full((batch, heads, rows, 1), float("-inf"))
    total = qg.new_zeros((batch, heads, rows, 1))
    for chunk in chunks:
        s = scores(chunk)
        new_max = torch.maximum(running_max, s.amax(-1, keepdim=True))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        total = total * torch.exp(running_max - safe_max) + torch.exp(s - safe_max).sum(-1, keepdim=True)
        running_max = new_max
    return _Softmax(running_max, total)


@torch.no_grad()
def _add_squared_attention(
    chunks: list[_Chunk],
    scores: Scorer,
    softmax: _Softmax,
    mass: torch.Tensor,
    offset: int,
    row_filter: Callable[[int, int], torch.Tensor] | None = None,
) -> None:
    """Add ``Σ_rows p²`` into ``mass`` [B, H, n], whose entry 0 is cached slot ``offset``.

    ``row_filter(start, end)`` ([R, end - start] bool) limits which rows count for each slot.
    """
    for chunk in chunks:
        lo, hi = max(chunk.start, offset), min(chunk.end, offset + mass.shape[-1])
        if lo >= hi:
            continue
        p = softmax.probabilities(scores(chunk))[..., lo - chunk.start : hi - chunk.start]
        if row_filter is not None:
            p = p * row_filter(lo, hi)
        mass[..., lo - offset : hi - offset] += p.square().sum(-2)


def _computed_once(scores: Scorer) -> Scorer:
    """``scores``, each chunk's kept after its first call while they fit in ``SCORE_MEMO_BYTES``.

    With the A² value policy a prefill reads every chunk's scores up to four times (softmax statistics,
    ranking of the blocks just quantized, the readout, the window's mass); the keys do not change between
    those passes (the policy only keeps values), so the logits need not be recomputed. Past the budget
    (long windows) chunks are scored again as before."""
    kept: dict[int, torch.Tensor] = {}
    used = 0

    def scores_once(chunk: _Chunk) -> torch.Tensor:
        nonlocal used
        s = kept.get(id(chunk))
        if s is None:
            s = scores(chunk)
            size = s.numel() * s.element_size()
            if used + size <= SCORE_MEMO_BYTES:
                kept[id(chunk)] = s
                used += size
        return s

    return scores_once


def _layer_chunks(inputs: AttentionInputs[HeadQLayer], qg: torch.Tensor, row_slots: torch.Tensor) -> list[_Chunk]:
    layer = inputs.layer
    q_side = None if layer.decoder is None else torch.einsum("bhrd,hdk->bhrk", qg, layer.decoder)
    step = -(-layer.config.chunk_size // layer.config.block_size) * layer.config.block_size
    chunks = [
        _quantized_chunk(inputs, qg, q_side, row_slots, s, min(s + step, layer.quantized_length))
        for s in range(0, layer.quantized_length, step)
    ]
    if layer.window_keys.shape[-2]:
        chunks.append(_dense_chunk(qg, layer.window_keys, layer.window_values, layer.quantized_length))
    return chunks


def _attend_layer(
    inputs: AttentionInputs[HeadQLayer],
    qg: torch.Tensor,
    q_len: int,
    groups: int,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Attention over a HeadQ layer, with the A² bookkeeping the layer asks for."""
    layer = inputs.layer
    row_slots = (inputs.query_start + torch.arange(q_len, device=qg.device)).repeat(groups)
    chunks = _layer_chunks(inputs, qg, row_slots)
    scores = _scorer(mask, row_slots, scaling, softcap)
    kept = layer.kept
    passes = (kept is not None and (kept.pending is not None or kept.window_mass is not None)) or (
        layer.attention_mass is not None
    )
    if passes:
        scores = _computed_once(scores)
    if kept is not None and kept.pending is not None:
        # Blocks quantized in this call: rank their tokens (A²) before any row reads them quantized.
        extra = None
        if kept.by_attention:
            pending = kept.pending_range
            assert pending is not None  # set whenever blocks are pending
            lo, hi = pending
            extra = qg.new_zeros((*qg.shape[:2], hi - lo))
            block = layer.config.block_size

            def exact_readers(start: int, end: int) -> torch.Tensor:
                last = (torch.arange(start, end, device=qg.device) // block + 1) * block - 1
                return (row_slots[:, None] < last[None, :]).float()

            _add_squared_attention(chunks, scores, _softmax_stats(qg, chunks, scores), extra, lo, exact_readers)
        kept.choose(extra)
    out, softmax = _attend(qg, chunks, scores)
    if layer.attention_mass is not None:
        _add_squared_attention(chunks, scores, softmax, layer.attention_mass.data, 0)
    if kept is not None and kept.window_mass is not None:
        _add_squared_attention(chunks, scores, softmax, kept.window_mass.data, layer.quantized_length)
    return out


def headq_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over a HeadQ cache layer (or plain dense states), transformers' signature.

    Returns the output as ``[B, Q, H_q, D]`` like the other attention functions.
    """
    if dropout and module.training:
        raise ValueError("the headq attention has no dropout: it is an inference cache; call model.eval()")
    batch, q_heads, q_len, head_dim = query.shape
    scaling = head_dim**-0.5 if scaling is None else scaling
    if isinstance(key, StaticDecodeStates):  # a fixed-capacity layer's decode step (compileable)
        return static_decode_attention(key, query, attention_mask, scaling, softcap), None
    kv_heads = key.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads cannot share {kv_heads} KV heads evenly")
    groups = q_heads // kv_heads
    if isinstance(key, HeadQStates):
        from .fused_decode import fused_decode_attention

        fused = fused_decode_attention(key.inputs.layer, query, attention_mask, scaling, softcap)
        if fused is not None:  # a decode step on the GPU: already [B, 1, Hq, D] in the query's dtype
            return fused, None
        if PREFILL_BY_SDPA and can_use_effective_sdpa(key.inputs, q_len, softcap):
            return effective_sdpa_attention(key.inputs, query, attention_mask, scaling), None
    # Rows are (group, query) pairs of the query heads sharing one KV head.
    qg = query.float().reshape(batch, kv_heads, groups * q_len, head_dim)
    mask = None if attention_mask is None else _grouped_mask(attention_mask, kv_heads, groups, q_len)
    if isinstance(key, HeadQStates):
        out = _attend_layer(key.inputs, qg, q_len, groups, mask, scaling, softcap)
    else:
        kv_len = key.shape[-2]
        row_slots = (kv_len - q_len + torch.arange(q_len, device=query.device)).repeat(groups)
        out, _ = _attend(qg, [_dense_chunk(qg, key, value, 0)], _scorer(mask, row_slots, scaling, softcap))
    out = out.reshape(batch, q_heads, q_len, -1).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def register_headq_attention() -> None:
    """Register ``headq`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, headq_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable_headq_attention(model: Any) -> None:
    """Switch ``model`` to the ``headq`` attention function."""
    register_headq_attention()
    model.set_attn_implementation(ATTENTION_NAME)
