"""Fused GPU kernels (Triton) for the ``headq`` attention, with the torch path as their oracle.

:func:`fused_decode_attention` handles decode steps (one query token per sequence) over a layer
whose settings the kernel covers, and returns ``None`` otherwise so the caller falls back to the
reference path. Triton is imported only when a kernel is first needed (``pip install
transformers-headq[gpu]``). ``HEADQ_KERNELS=0`` turns the kernels off; on CPU they run only under
``TRITON_INTERPRET=1`` (the tests do that).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

from ..store import DenseStore, QuantizedStore

if TYPE_CHECKING:
    from ..cache import HeadQLayer

_PACKABLE_BITS = (1, 2, 4, 8)


def kernels_enabled(device: torch.device) -> bool:
    """Whether fused kernels may run for tensors on ``device``."""
    if os.environ.get("HEADQ_KERNELS", "1") == "0" or importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def kernel_supports(layer: HeadQLayer) -> bool:
    """Whether the decode kernel covers this layer's storage settings."""
    cfg = layer.config
    _, _, head_dim = layer.shape
    return (
        isinstance(layer.key_store, QuantizedStore)
        and cfg.key_grouping == "channel"
        and cfg.key_bits in _PACKABLE_BITS
        and _power_of_two(cfg.block_size)
        and _power_of_two(head_dim)
        and (layer.rank == 0 or (cfg.side_bits in _PACKABLE_BITS and layer.rank <= 128))
        and (cfg.value_bits is None or (cfg.value_bits in _PACKABLE_BITS and cfg.channel_group in (None, head_dim)))
        and cfg.value_keep == 0  # A² kept values: reference path for now
        and not cfg.track_attention
    )


def _key_validity(mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """``[B, K]`` key validity from a decode mask ``[B, 1, 1, K]`` (bool), or ``None`` without one."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[-1] != kv_len:
        raise ValueError("unsupported mask")
    return mask[:, 0, 0, :].expand(batch, kv_len)


def fused_decode_attention(
    layer: HeadQLayer,
    query: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor | None:
    """Attention output ``[B, Hq, 1, D]`` (float32) for one decode step, or ``None`` if not covered.

    The quantized tokens go through the Triton kernel in splits; the full-precision window (fewer
    than ``block_size`` tokens) is scored in torch, and all partial softmaxes are merged exactly.
    """
    batch, q_heads, q_len, head_dim = query.shape
    if q_len != 1 or not kernels_enabled(query.device) or not kernel_supports(layer) or layer.quantized_length == 0:
        return None
    if layer.kept is not None and layer.kept.pending is not None:
        return None
    kv_heads = layer.shape[1]
    groups = q_heads // kv_heads
    n_quantized = layer.quantized_length
    try:
        valid = _key_validity(mask, batch, layer.stored_length)
    except ValueError:
        return None

    q = query.float().reshape(batch, kv_heads, groups, head_dim).contiguous()
    partial = _quantized_partials(layer, q, valid, n_quantized, scaling, softcap)
    window = _window_partial(layer, q, valid, n_quantized, scaling, softcap)
    m, norm, acc = (torch.cat([a, b], dim=2) for a, b in zip(partial, window, strict=True))
    out = merge_partials(m, norm, acc)
    return out.reshape(batch, q_heads, 1, -1)


def merge_partials(m: torch.Tensor, norm: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Combine split softmaxes (max ``m``, normaliser ``norm`` ``[..., S, G]``, unnormalised output
    ``acc [..., S, G, D]``) into ``[..., G, D]``."""
    top = m.amax(dim=-2, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(m - top)  # exp(-inf) = 0 for empty splits
    total = (norm * weight).sum(-2)
    return (acc * weight[..., None]).sum(-3) / total[..., None]


def _splits(batch_heads: int, n_tokens: int, block: int, device: torch.device) -> tuple[int, int]:
    """Split the tokens so that the grid covers the GPU a few times over (flash-decoding)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    blocks = -(-n_tokens // block)
    wanted = max(1, min(blocks, -(-4 * sms // batch_heads)))
    per_split = -(-blocks // wanted) * block
    return -(-n_tokens // per_split), per_split


def _quantized_partials(
    layer: HeadQLayer,
    q: torch.Tensor,
    valid: torch.Tensor | None,
    n_tokens: int,
    scaling: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .decode import headq_decode_kernel

    cfg = layer.config
    batch, kv_heads, groups, head_dim = q.shape
    block_g = max(16, triton_next_power_of_2(groups))
    rank = layer.rank
    assert isinstance(layer.key_store, QuantizedStore)
    keys = layer.key_store.packed()
    if rank:
        assert layer.decoder is not None and isinstance(layer.side_store, QuantizedStore)
        qw = torch.einsum("bhgd,hdr->bhgr", q, layer.decoder).contiguous()
        side = layer.side_store.packed()
    else:
        qw, side = q, keys  # unused by the kernel when R == 0
    if isinstance(layer.value_store, DenseStore):
        value_codes = layer.value_store.rows()
        value_scale = value_zero = value_codes
        value_bits = 0
    else:
        assert isinstance(layer.value_store, QuantizedStore)
        packed_values = layer.value_store.packed()
        value_codes, value_scale, value_zero = packed_values.codes, packed_values.scale, packed_values.zero
        value_bits = cfg.value_bits or 0
    n_splits, per_split = _splits(batch * kv_heads, n_tokens, cfg.block_size, q.device)
    m = q.new_empty(batch, kv_heads, n_splits, block_g)
    norm = torch.empty_like(m)
    acc = q.new_empty(batch, kv_heads, n_splits, block_g, head_dim)
    validity = valid[:, :n_tokens].to(torch.uint8).contiguous() if valid is not None else q
    headq_decode_kernel[(batch * kv_heads, n_splits)](
        q, qw,
        keys.codes, keys.scale, keys.zero,
        side.codes, side.scale, side.zero,
        value_codes, value_scale, value_zero,
        validity,
        m, norm, acc,
        n_tokens, per_split, scaling, softcap or 0.0,
        *_bht(keys.codes), *_bht(keys.scale),
        *_bht(side.codes), *_bht(side.scale),
        *_bht(value_codes), *_bht(value_scale),
        validity.stride(0) if valid is not None else 0,
        H_KV=kv_heads, G=groups, BLOCK_G=block_g, D=head_dim, R=rank,
        R_PAD=max(16, triton_next_power_of_2(rank)) if rank else 16,
        KEY_BITS=cfg.key_bits, SIDE_BITS=cfg.side_bits or 8, SIDE_PER_TOKEN=cfg.side_scale == "token",
        VALUE_BITS=value_bits, BLOCK_N=cfg.block_size, HAS_MASK=valid is not None, SOFTCAP=softcap is not None,
    )  # fmt: skip
    return m[..., :groups], norm[..., :groups], acc[..., :groups, :]


def _bht(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and token strides of a ``[B, H, T, C]`` (strided) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _window_partial(
    layer: HeadQLayer,
    q: torch.Tensor,
    valid: torch.Tensor | None,
    start: int,
    scaling: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full-precision window as one more split: ``m, l [B, H, 1, G]``, ``acc [B, H, 1, G, D]``."""
    keys, values = layer.window_keys.float(), layer.window_values.float()
    if keys.shape[2] == 0:
        m = q.new_full((*q.shape[:2], 1, q.shape[2]), float("-inf"))
        return m, torch.zeros_like(m), q.new_zeros((*q.shape[:2], 1, *q.shape[2:]))
    s = (q @ keys.transpose(-1, -2)) * scaling  # [B, H, G, W]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None, start:], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m_safe)
    return m.transpose(-1, -2), p.sum(-1)[..., None, :], (p @ values)[:, :, None]
