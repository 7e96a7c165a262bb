"""Decode attention over a growing HeadQ layer by the fused GPU kernel: the layer's side of the launch.

The kernels (``kernels/``) take tensors and settings; this reads a :class:`HeadQLayer`'s stores, window
and basis, checks that the kernel covers them, and returns ``None`` where it does not, so that the
caller falls back to the reference path (the oracle the kernel is tested against).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .kernels import (
    DecodeSettings,
    cuda_decode,
    decode_supports,
    kernels_enabled,
    key_validity,
    mask_covered,
    triton_decode_attention,
)
from .layer import HeadQLayer
from .quantize import QuantizedTokens
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


class _CudaLaunch(NamedTuple):
    """A layer's launch of the CUDA kernel (``cuda_decode.store_launch``; ``None``: its stores do not fit the
    kernel) and what it was made for: the stores' tensors (the same objects while no block is flushed), held weakly,
    and the step's query shape, dtype and launch settings."""

    stores: tuple[Callable[[], torch.Tensor | None], ...]
    step: tuple[object, ...]
    launch: Any


def _absent() -> None:
    """The weak reference of a store the layer does not have (no sinks, no side code)."""
    return None


# Per layer: its CUDA kernel launch, made again when the stores change, so that a decode step passes only the
# query and the window. Kept outside the layer (copying a cache copies none of it), as _SETTINGS. The launch keeps
# the stores' addresses and this their weak references: neither keeps a layer's old buffers alive (a reset or crop
# frees them); a store that died or was replaced makes a new launch, so no launch reads memory that moved.
_CUDA_LAUNCHES: weakref.WeakKeyDictionary[HeadQLayer, _CudaLaunch] = weakref.WeakKeyDictionary()


def _cuda_launch(
    layer: HeadQLayer, settings: DecodeSettings, query: torch.Tensor, keys: QuantizedTokens,
    side: QuantizedTokens | None, values: QuantizedTokens,
) -> Any | None:  # fmt: skip
    """The layer's launch of the CUDA kernel over its stores as they are now (the one kept, or a new one)."""
    stores: tuple[torch.Tensor | None, ...] = (
        keys.codes,
        keys.scale,
        keys.zero,
        values.codes,
        values.scale,
        values.zero,
        layer.sink_keys,
        layer.decoder,
    )
    if side is not None:
        stores += (side.codes, side.scale, side.zero)
    step = (query.shape, query.dtype, tuple(cuda_decode.LAUNCH.values()))
    known = _CUDA_LAUNCHES.get(layer)
    if (
        known is None
        or known.step != step
        or len(known.stores) != len(stores)
        or not all(map(operator.is_, [ref() for ref in known.stores], stores))  # the very tensors, all alive
    ):
        launch = cuda_decode.store_launch(query, layer.decoder, keys, side, values, layer.sink_keys, settings.block)
        refs = tuple(_absent if t is None else weakref.ref(t) for t in stores)
        known = _CUDA_LAUNCHES[layer] = _CudaLaunch(refs, step, launch)
    return known.launch


def fused_decode_attention(
    layer: HeadQLayer, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None
) -> torch.Tensor | None:
    """Attention output ``[B, 1, Hq, D]`` in the query's dtype for one decode step, or ``None`` if not covered:
    the CUDA kernel where it covers the settings (``cuda_decode.covers``) and the tensors fit it, else the Triton
    kernels."""
    batch, q_heads, q_len, head_dim = query.shape
    if q_len != 1 or not kernels_enabled(query.device):
        return None
    settings = _settings(layer, q_heads)
    kv_len = layer.stored_length
    if settings is None or layer.quantized_length == 0 or not mask_covered(mask, kv_len):
        return None
    assert isinstance(layer.key_store, QuantizedStore)
    keys, side = layer.key_store.packed(), None
    if layer.rank:
        assert isinstance(layer.side_store, QuantizedStore)
        side = layer.side_store.packed()
    values = layer.value_store.packed() if isinstance(layer.value_store, QuantizedStore) else layer.value_store.rows()  # type: ignore[attr-defined]
    valid = key_validity(mask, batch, kv_len)
    if cuda_decode.covers(settings, query, values):
        launch = _cuda_launch(layer, settings, query, keys, side, values)
        out = None if launch is None else launch(query, layer.window_keys, layer.window_values, valid, scaling,
                                                 softcap or 0.0)  # fmt: skip
        if out is not None:
            return out  # type: ignore[no-any-return]
    return triton_decode_attention(
        settings, query, layer.decoder, keys, side, values,
        layer.window_keys, layer.window_values, mask, scaling, softcap, layer.sink_keys,
    )  # fmt: skip
