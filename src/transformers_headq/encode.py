"""Encoding whole blocks of keys and values (key codes, side code, value codes): one code path.

Every block a cache stores goes through :func:`encode_blocks`: the growing cache's flush, a
fixed-capacity prefill, and a compiled decode step's commit (:func:`commit_block`, a torch custom
op). On a GPU whose settings the block kernel covers, that is one kernel
(``kernels/block_encode.py``); elsewhere the torch quantizer and the side code ``Uᵀ(k − k̂)``. Because
eager and compiled caches take the same path on a device, they hold bit-identical codes (and
inductor never gets to fuse the quantizer's arithmetic its own way: the op is opaque to it).

A stream's spec is ``[]`` for dense rows, or ``[bits, 1 if channel grouping else 0, group]``: custom
ops take plain values, not quantizer objects.
"""

from __future__ import annotations

import torch

from .arena import carve
from .kernels import Quantizers, block_encode_supports, kernels_enabled, quantize_pack, split_stored
from .kernels import commit_block as commit_block_kernel
from .kernels import encode_blocks as encode_blocks_kernel
from .mixed_keys import MixedKeyQuantizer
from .quantize import GroupQuantizer, QuantizedTokens
from .store import write_block_where

# A layer's quantizers as the torch encoder takes them: keys may also have per-channel widths.
LayerQuantizers = tuple[GroupQuantizer | MixedKeyQuantizer | None, GroupQuantizer | None, GroupQuantizer | None]


def quantizer_spec(quantizer: GroupQuantizer | None) -> list[int]:
    return [] if quantizer is None else [quantizer.bits, int(quantizer.grouping == "channel"), quantizer.group]


def quantizer_from_spec(spec: list[int], meta_dtype: torch.dtype) -> GroupQuantizer | None:
    if not spec:
        return None
    bits, channel, group = spec
    return GroupQuantizer(bits, "channel" if channel else "token", group, meta_dtype)


def _quantize(quantizer: GroupQuantizer, x: torch.Tensor) -> QuantizedTokens:
    """The GPU quantize-and-pack kernel where it applies (one launch, the same bits), else torch's."""
    q = quantize_pack(quantizer, x)
    return quantizer.quantize(x) if q is None else q


def _encode_torch(
    keys: torch.Tensor, values: torch.Tensor, encoder: torch.Tensor | None, quantizers: LayerQuantizers
) -> list[torch.Tensor]:
    key_q, side_q, value_q = quantizers
    out: list[torch.Tensor] = []
    if isinstance(key_q, MixedKeyQuantizer):
        parts = key_q.quantize(keys)
        out += [t for q in parts for t in (q.codes, q.scale, q.zero)]
        key_hat = key_q.dequantize(parts, keys.dtype)
    elif key_q is not None:
        q = _quantize(key_q, keys)
        out += [q.codes, q.scale, q.zero]
        key_hat = key_q.dequantize(q, keys.shape[-1], keys.dtype)  # as stored, in the model dtype
    else:
        out.append(keys)
        key_hat = keys
    if encoder is not None:
        side = torch.einsum("bhtd,hdr->bhtr", keys.float() - key_hat.float(), encoder)
        if side_q is not None:
            s = _quantize(side_q, side)
            out += [s.codes, s.scale, s.zero]
        else:
            out.append(side.to(keys.dtype))
    if value_q is not None:
        v = _quantize(value_q, values)
        out += [v.codes, v.scale, v.zero]
    else:
        out.append(values)
    return out


def _kernel_quantizers(quantizers: LayerQuantizers) -> Quantizers | None:
    """The quantizers as the kernels take them, or None for per-channel key widths (torch only)."""
    key_q, side_q, value_q = quantizers
    return None if isinstance(key_q, MixedKeyQuantizer) else (key_q, side_q, value_q)


def _fused(keys: torch.Tensor, encoder: torch.Tensor | None, quantizers: LayerQuantizers, block: int) -> bool:
    """Whether the block kernel encodes these blocks (on a GPU only: on a CPU torch is faster than the
    interpreter, and the tests call the kernel there directly)."""
    rank = 0 if encoder is None else encoder.shape[-1]
    plain = _kernel_quantizers(quantizers)
    return (
        plain is not None
        and keys.is_cuda
        and kernels_enabled(keys.device)
        and block_encode_supports(plain, rank, block, keys.shape[-1], keys.dtype)
    )


def encode_blocks(
    keys: torch.Tensor, values: torch.Tensor, encoder: torch.Tensor | None, quantizers: LayerQuantizers, block: int
) -> list[torch.Tensor]:
    """Stored tensors of whole blocks ``[B, H, n·block, D]``: keys' (codes, scale, zero; per width with
    per-channel widths) or dense keys, then the side code's (if ``encoder``), then the values', each stream
    as its store appends them."""
    plain = _kernel_quantizers(quantizers)
    if plain is not None and _fused(keys, encoder, quantizers, block):
        return encode_blocks_kernel(keys, values, encoder, plain, block)
    return _encode_torch(keys, values, encoder, quantizers)


def stored_parts(spec: list[int]) -> int:
    """Tensors a stream of this spec is stored as: codes, scale, zero (3), or dense rows (1)."""
    return 3 if spec else 1


@torch.library.custom_op("headq::commit_block", mutates_args=("arena",))
def commit_block(
    keys: torch.Tensor,
    values: torch.Tensor,
    arena: torch.Tensor,
    layout: str,
    key_spec: list[int],
    side_spec: list[int],
    value_spec: list[int],
    rank: int,
    meta_dtype: torch.dtype,
    target: torch.Tensor,
    commit: torch.Tensor,
) -> None:
    """Encode the window ``[B, H, block, D]`` into block ``target[0]`` of a fixed-capacity layer's stores
    where ``commit[0]``. ``arena`` holds the stores' tensors (listed as :func:`encode_blocks` lists a
    block), then the encoder if ``rank``, cut by ``layout`` (see :mod:`.arena`).

    On the GPU one kernel that returns at once unless the flag is set; elsewhere the encoding runs
    and the rows are written back unchanged where the flag is off (no host branch either way)."""
    quantizers = (
        quantizer_from_spec(key_spec, meta_dtype),
        quantizer_from_spec(side_spec, meta_dtype),
        quantizer_from_spec(value_spec, meta_dtype),
    )
    stored = split_stored(
        carve(arena, layout), stored_parts(key_spec), stored_parts(side_spec) if rank else 0, stored_parts(value_spec)
    )
    storage, encoder = stored.keys + stored.side + stored.values, stored.encoder
    if _fused(keys, encoder, quantizers, keys.shape[2]):
        commit_block_kernel(keys, values, encoder, quantizers, storage, target, commit)
        return
    # contiguous: the window's keys and values are views of one buffer, and a strided einsum may sum in
    # another order than the growing cache's flush does on its contiguous blocks
    encoded = _encode_torch(keys.contiguous(), values.contiguous(), encoder, quantizers)
    for data, part in zip(storage, encoded, strict=True):
        write_block_where(data, target, part, commit)


@commit_block.register_fake
def _(*args: object) -> None:
    """Writes in place, returns nothing."""
