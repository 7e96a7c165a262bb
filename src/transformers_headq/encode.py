"""Encoding one block of keys and values (codes, side code), as a torch custom op.

A compiled decode step commits the window as a block; if inductor fused the quantizer's arithmetic
into its own kernels, a rounding tie could land on another code than in eager mode. As an opaque
custom op the block is encoded by exactly the code eager decode and prefill run
(:meth:`GroupQuantizer.quantize`, or on a GPU the quantize-and-pack kernel that stores the same bits,
and the side code ``Uᵀ(k − k̂)``), so compiled and eager caches hold bit-identical codes.

A stream's spec is ``[]`` for dense rows, or ``[bits, 1 if channel grouping else 0, group]``.
"""

from __future__ import annotations

from typing import Any

import torch

from .kernels import quantize_pack
from .quantize import GroupQuantizer, QuantizedTokens


def quantizer_spec(quantizer: GroupQuantizer | None) -> list[int]:
    return [] if quantizer is None else [quantizer.bits, int(quantizer.grouping == "channel"), quantizer.group]


def _quantizer(spec: list[int], meta_dtype: torch.dtype) -> GroupQuantizer:
    bits, channel, group = spec
    return GroupQuantizer(bits, "channel" if channel else "token", group, meta_dtype)


def _quantize(quantizer: GroupQuantizer, x: torch.Tensor, fused: bool) -> QuantizedTokens:
    """The GPU quantize-and-pack kernel where it applies (one launch, the same bits), else torch's."""
    q = quantize_pack(quantizer, x) if fused else None
    return quantizer.quantize(x) if q is None else q


def _encode(
    keys: torch.Tensor,
    values: torch.Tensor,
    encoder: torch.Tensor | None,
    key_spec: list[int],
    side_spec: list[int],
    value_spec: list[int],
    meta_dtype: torch.dtype,
    *,
    fused: bool = True,
) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if key_spec:
        key_quantizer = _quantizer(key_spec, meta_dtype)
        q = _quantize(key_quantizer, keys, fused)
        out += [q.codes, q.scale, q.zero]
        key_hat = key_quantizer.dequantize(q, keys.shape[-1], keys.dtype)  # as stored, in the model dtype
    else:
        out.append(keys.clone())
        key_hat = keys
    if encoder is not None:
        side = torch.einsum("bhtd,hdr->bhtr", keys.float() - key_hat.float(), encoder)
        if side_spec:
            s = _quantize(_quantizer(side_spec, meta_dtype), side, fused)
            out += [s.codes, s.scale, s.zero]
        else:
            out.append(side.to(keys.dtype))
    if value_spec:
        v = _quantize(_quantizer(value_spec, meta_dtype), values, fused)
        out += [v.codes, v.scale, v.zero]
    else:
        out.append(values.clone())
    return out


@torch.library.custom_op("headq::encode_block", mutates_args=())
def encode_block(
    keys: torch.Tensor,
    values: torch.Tensor,
    encoder: torch.Tensor | None,
    key_spec: list[int],
    side_spec: list[int],
    value_spec: list[int],
    meta_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Stored tensors of one block ``[B, H, block, D]``: keys' (codes, scale, zero) or dense keys, then
    the side code's (if ``encoder``), then the values'."""
    return _encode(keys, values, encoder, key_spec, side_spec, value_spec, meta_dtype)


@encode_block.register_fake
def _(*args: Any) -> list[torch.Tensor]:
    """Shapes only: the same encoding on fake tensors, through torch's quantizer (no kernel launch)."""
    return _encode(*args, fused=False)
