"""Decode attention over a growing HeadQ layer by the fused GPU kernel: the layer's side of the launch.

The kernels (``kernels/``) take tensors and settings; this reads a :class:`HeadQLayer`'s stores, window
and basis, checks that the kernel covers them, and returns ``None`` where it does not, so that the
caller falls back to the reference path (the oracle the kernel is tested against).
"""

from __future__ import annotations

import weakref

import torch

from .kernels import DecodeSettings, decode_attention, decode_supports, kernels_enabled, mask_covered
from .layer import HeadQLayer
from .store import QuantizedStore


def kernel_covers(layer: HeadQLayer) -> bool:
    """Whether the decode kernel covers this layer's storage settings (A² kept values and the attention
    tracker need the reference path)."""
    cfg = layer.config
    return (
        isinstance(layer.key_store, QuantizedStore)
        and cfg.value_keep == 0
        and not cfg.track_attention
        and decode_supports(layer._quantizers(), layer.rank, cfg.block_size, layer.shape[2])
    )


# Per layer: the query heads and dtype its settings were made for, and the settings (None: not covered).
# Kept outside the layer (copying a cache copies none of it); made once, not at every step (host time).
_SETTINGS: weakref.WeakKeyDictionary[HeadQLayer, tuple[int, torch.dtype, DecodeSettings | None]] = (
    weakref.WeakKeyDictionary()
)


def _settings(layer: HeadQLayer, q_heads: int) -> DecodeSettings | None:
    known = _SETTINGS.get(layer)
    if known is None or known[:2] != (q_heads, layer.dtype):
        settings = None
        if kernel_covers(layer):
            _, kv_heads, head_dim = layer.shape
            settings = DecodeSettings(
                layer._quantizers(), layer.rank, layer.config.block_size, kv_heads, head_dim, q_heads, layer.dtype
            )
        known = _SETTINGS[layer] = (q_heads, layer.dtype, settings)
    return known[2]


def fused_decode_attention(
    layer: HeadQLayer, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None
) -> torch.Tensor | None:
    """Attention output ``[B, 1, Hq, D]`` in the query's dtype for one decode step, or ``None`` if not covered."""
    batch, q_heads, q_len, head_dim = query.shape
    if q_len != 1 or not kernels_enabled(query.device):
        return None
    settings = _settings(layer, q_heads)
    if settings is None or layer.quantized_length == 0 or not mask_covered(mask, layer.stored_length):
        return None
    assert isinstance(layer.key_store, QuantizedStore)
    side = None
    if layer.rank:
        assert isinstance(layer.side_store, QuantizedStore)
        side = layer.side_store.packed()
    values = layer.value_store.packed() if isinstance(layer.value_store, QuantizedStore) else layer.value_store.rows()  # type: ignore[attr-defined]
    return decode_attention(
        settings, query, layer.decoder, layer.key_store.packed(), side, values,
        layer.window_keys, layer.window_values, mask, scaling, softcap, layer.sink_keys,
    )  # fmt: skip
