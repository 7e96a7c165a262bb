"""Decode attention over a fixed-capacity HeadQ layer with no host-side lengths (compileable).

Logits of quantized slot ``j`` are ``(q·k̂_j + (qW)·ĉ_j) · scaling`` and of window slot ``w`` the exact
``q·k_w · scaling``, as in the reference path. Every slot of the capacity is scored; slots past the
device-side ``quantized`` count and window slots past ``fill`` are masked out, so the graph has one
shape for every step. Slot ``j`` of the quantized part is position ``j``; window slot ``w`` is
position ``quantized + w`` (the mask transformers builds for a static layer spans the capacity).
"""

from __future__ import annotations

import torch

from .handoff import StaticDecodeStates
from .kernels import kernel_supports, kernels_enabled
from .kernels.fixed import fixed_decode_attention
from .store import QuantizedStore


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
    if kernels_enabled(query.device) and kernel_supports(layer) and _mask_is_per_key(mask):
        return _fused(states, query, mask, scaling, softcap)
    batch, q_heads, _, head_dim = query.shape
    kv_heads = layer.shape[1]
    groups = q_heads // kv_heads
    qg = query.float().reshape(batch, kv_heads, groups, head_dim)
    key_hat = layer.key_store.read_capacity(torch.float32)
    logits = qg @ key_hat.transpose(-1, -2)
    if layer.side_store is not None:
        assert layer.decoder is not None
        q_side = torch.einsum("bhgd,hdr->bhgr", qg, layer.decoder)
        logits = logits + q_side @ layer.side_store.read_capacity(torch.float32).transpose(-1, -2)
    window_logits = qg @ layer._window_k.float().transpose(-1, -2)
    scores = torch.cat([logits, window_logits], dim=-1) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    slots = torch.arange(layer.capacity, device=query.device)
    window_slots = torch.arange(layer.config.block_size, device=query.device)
    visible = torch.cat([slots < layer.quantized, window_slots < layer.fill])
    columns = _mask_columns(mask, torch.cat([slots, layer.quantized + window_slots]))
    keep = visible if columns is None else visible & columns
    scores = scores.masked_fill(~keep, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isinf(top), torch.zeros_like(top), top))
    total = weights.sum(-1, keepdim=True)
    values = torch.cat([layer.value_store.read_capacity(torch.float32), layer._window_v.float()], dim=-2)
    out = (weights @ values) / torch.where(total > 0, total, torch.ones_like(total))
    return out.reshape(batch, q_heads, 1, -1).transpose(1, 2).to(query.dtype)


def _mask_is_per_key(mask: torch.Tensor | None) -> bool:
    """A decode mask the kernel reads: none, or a boolean ``[B, 1, 1, K]`` key mask shared by the heads."""
    return mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1 and mask.shape[2] == 1)


def _storages(store: object) -> list[torch.Tensor]:
    """Codes, scales and zeros of a quantized store (dense rows three times: scales are not read)."""
    buffers = [b.storage for b in store.buffers()]  # type: ignore[attr-defined]
    return buffers if isinstance(store, QuantizedStore) else buffers * 3


def _fused(
    states: StaticDecodeStates, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None
) -> torch.Tensor:
    layer = states.layer
    cfg = layer.config
    keys = _storages(layer.key_store)
    side = _storages(layer.side_store) if layer.side_store is not None else keys
    values = _storages(layer.value_store)
    validity = None
    if mask is not None:
        validity = mask[:, 0, 0, :].expand(query.shape[0], mask.shape[-1]).to(torch.uint8)
    value_bits = cfg.value_bits if isinstance(layer.value_store, QuantizedStore) else 0
    return fixed_decode_attention(
        query, layer.decoder if layer.decoder is not None else query,
        *keys, *side, *values,
        layer._window_k, layer._window_v, validity, layer.lengths,
        scaling, softcap or 0.0, cfg.key_bits or 0, cfg.side_bits or 8, cfg.side_scale == "token", value_bits or 0,
        layer.rank,
    )  # fmt: skip
