"""Decode attention over a fixed-capacity HeadQ layer with no host-side lengths (compileable).

Logits of quantized slot ``j`` are ``(q·k̂_j + (qW)·ĉ_j) · scaling`` and of window slot ``w`` the exact
``q·k_w · scaling``, as in the reference path; the first ``sink_keys`` slots read their exact keys.
Every slot of the capacity is scored; slots past the device-side ``quantized`` count and window slots
past ``fill`` are masked out, so the graph has one shape for every step. Slot ``j`` of the quantized part
is position ``j``; window slot ``w`` is position ``quantized + w`` (the mask transformers builds for a
static layer spans the capacity).
"""

from __future__ import annotations

import torch

from .arena import carve
from .encode import quantizer_from_spec, stored_parts
from .kernels import kernels_enabled, split_stored
from .kernels.fixed import fixed_decode_attention
from .quantize import QuantizedTokens
from .static import FixedPlan, StaticDecodeStates


def _mask_columns(mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    """``[B, 1, 1, n]`` bool: the mask's columns at ``positions`` (clamped into its width)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2  # an additive mask: 0 where visible
    index = positions.clamp(max=mask.shape[-1] - 1)
    return mask[:, :1, -1:].index_select(-1, index)


def static_decode_attention(
    states: StaticDecodeStates,
    query: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Attention output ``[B, 1, Hq, D]`` in the query's dtype for one decode step: the fused kernel
    where it covers the layer (a GPU, or Triton's interpreter), else the torch path below."""
    layer = states.layer
    if kernels_enabled(query.device) and layer.plan.fused and _mask_is_per_key(mask):
        return _fused(states, query, mask, scaling, softcap)
    plan = layer.plan
    batch, q_heads, _, head_dim = query.shape
    kv_heads = layer.window.shape[1]
    groups = q_heads // kv_heads
    qg = query.float().reshape(batch, kv_heads, groups, head_dim)
    key_hat, side, value, decoder = _read_capacity(layer.arena, plan)
    logits = qg @ key_hat.transpose(-1, -2)
    if side is not None:
        assert decoder is not None
        logits = logits + torch.einsum("bhgd,hdr->bhgr", qg, decoder) @ side.transpose(-1, -2)
    if plan.sink_keys:  # exact keys, no side code (masked with the quantized slots until block 0 is)
        sink_logits = qg @ layer._sink_rows.float().transpose(-1, -2)
        logits = torch.cat([sink_logits, logits[..., plan.sink_keys :]], dim=-1)
    scores = torch.cat([logits, qg @ layer._window_k.float().transpose(-1, -2)], dim=-1) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    slots = torch.arange(plan.capacity, device=query.device)
    window_slots = torch.arange(plan.block_size, device=query.device)
    quantized, fill = layer.quantized, layer.fill
    visible = torch.cat([slots < quantized, window_slots < fill])
    columns = _mask_columns(mask, torch.cat([slots, quantized + window_slots]))
    keep = visible if columns is None else visible & columns
    scores = scores.masked_fill(~keep, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isinf(top), torch.zeros_like(top), top))
    total = weights.sum(-1, keepdim=True)
    values = torch.cat([value, layer._window_v.float()], dim=-2)
    out = (weights @ values) / torch.where(total > 0, total, torch.ones_like(total))
    return out.reshape(batch, q_heads, 1, -1).transpose(1, 2).to(query.dtype)


def _read_capacity(
    arena: torch.Tensor, plan: FixedPlan
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Keys ``k̂``, side codes and values over the whole capacity (float32) and the decoder, from the
    arena (side codes and decoder ``None`` without a side code)."""
    side_parts = stored_parts(list(plan.side_spec)) if plan.rank else 0
    stored = split_stored(
        carve(arena, plan.layout), stored_parts(list(plan.key_spec)), side_parts, stored_parts(list(plan.value_spec))
    )

    def dense(tensors: list[torch.Tensor], spec: tuple[int, ...], channels: int) -> torch.Tensor:
        quantizer = quantizer_from_spec(list(spec), plan.meta_dtype)
        if quantizer is None:
            return tensors[0].float()
        return quantizer.dequantize(QuantizedTokens(*tensors), channels, torch.float32)

    side = dense(stored.side, plan.side_spec, plan.rank) if plan.rank else None
    keys, values = (
        dense(stored.keys, plan.key_spec, plan.key_dim),
        dense(stored.values, plan.value_spec, plan.value_dim),
    )
    return keys, side, values, stored.decoder


def _mask_is_per_key(mask: torch.Tensor | None) -> bool:
    """A decode mask the kernel reads: none, or a boolean ``[B, 1, 1, K]`` key mask shared by the heads."""
    return mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1 and mask.shape[2] == 1)


def _fused(
    states: StaticDecodeStates, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None
) -> torch.Tensor:
    layer = states.layer
    plan = layer.plan
    validity = None
    if mask is not None:
        validity = mask[:, 0, 0, :].expand(query.shape[0], mask.shape[-1]).to(torch.uint8)
    key_bits = plan.key_spec[0] if plan.key_spec else 0
    side_bits = plan.side_spec[0] if plan.side_spec else 8
    side_per_token = bool(plan.side_spec) and not plan.side_spec[1]
    value_bits = plan.value_spec[0] if plan.value_spec else 0
    return fixed_decode_attention(
        query, layer.arena, plan.layout, layer.window, validity, layer.state,
        scaling, softcap or 0.0, key_bits, side_bits, side_per_token, value_bits, plan.rank, plan.sink_keys,
    )  # fmt: skip
