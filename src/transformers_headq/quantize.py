"""Bit packing and asymmetric uniform group quantizers (pure torch reference path).

Why our own packing instead of optimum-quanto's ``PackedTensor``: quanto packs 2- and 4-bit
weights along dim 0 in planes (row ``i`` of every plane shares a byte). A KV cache grows along
the token axis, so packing across tokens would force a repack on every append, and the fused
decode kernels want each token's codes contiguous. Here codes are packed along the *last* axis
(channels) of each token row, so one token is one packed row and appending tokens is a
concatenation. Within a row, widths that divide a byte are packed in *planes*: a row of ``n``
codes takes ``m = ceil(n * bits / 8)`` bytes, and plane ``p`` (bits ``[p*bits, (p+1)*bits)`` of
every byte) holds codes ``p*m ... p*m + m - 1``. A kernel then gets each plane's codes with one
shift and mask of the loaded bytes, already in channel order, with no interleaving to undo (see
``kernels/decode.py``). 3-bit codes straddle bytes and are packed as a little-endian bit stream.
This module knows nothing of caches or attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Grouping = Literal["token", "channel"]
SUPPORTED_BITS = (1, 2, 3, 4, 8)


def check_bits(bits: int) -> None:
    """Raise a clear error for a bit width the packers do not support."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def packed_row_bytes(n_codes: int, bits: int) -> int:
    """Bytes one packed row of ``n_codes`` codes of ``bits`` bits occupies."""
    return (n_codes * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into uint8.

    For 1/2/4 bits the row is padded with zero codes to ``m * 8 // bits`` codes (``m`` bytes) and
    code ``p*m + j`` lands in byte ``j`` at bits ``[p*bits, (p+1)*bits)`` (planar layout). For 3
    bits code ``i`` occupies bits ``[i*3, (i+1)*3)`` of the row's little-endian bit stream.
    """
    check_bits(bits)
    n = codes.shape[-1]
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if 8 % bits == 0:
        per_byte, n_bytes = 8 // bits, packed_row_bytes(n, bits)
        codes = torch.nn.functional.pad(codes, (0, n_bytes * per_byte - n))
        planes = codes.reshape(*codes.shape[:-1], per_byte, n_bytes)
        packed = torch.zeros(planes.shape[:-2] + (n_bytes,), dtype=torch.uint8, device=codes.device)
        for p in range(per_byte):
            packed |= planes[..., p, :] << (bits * p)
        return packed
    # Widths that straddle bytes (3 bits): expand to a bit stream, then pack 8 bits a byte.
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    bit_stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(*codes.shape[:-1], n * bits)
    pad = (-bit_stream.shape[-1]) % 8
    if pad:
        bit_stream = torch.nn.functional.pad(bit_stream, (0, pad))
    bytes_ = bit_stream.reshape(*bit_stream.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    return (bytes_ * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n_codes`` codes of each packed row, as uint8."""
    check_bits(bits)
    if packed.shape[-1] != packed_row_bytes(n_codes, bits):
        raise ValueError(
            f"packed rows hold {packed.shape[-1]} bytes but {n_codes} codes of {bits} bits need "
            f"{packed_row_bytes(n_codes, bits)}"
        )
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        planes = (packed.unsqueeze(-2) >> shifts.unsqueeze(-1)) & mask  # [..., planes, bytes]
        return planes.flatten(-2)[..., :n_codes]
    shifts8 = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bit_stream = ((packed.unsqueeze(-1) >> shifts8) & 1).reshape(*packed.shape[:-1], -1)
    bit_stream = bit_stream[..., : n_codes * bits].reshape(*packed.shape[:-1], n_codes, bits)
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32)).to(torch.uint8)
    return (bit_stream * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


@dataclass
class QuantizedTokens:
    """Packed codes of a run of tokens with their group scales and zero points.

    ``codes``: ``[B, H, T, packed_row_bytes(C, bits)]`` uint8, one packed row per token.
    ``scale``/``zero``: ``[B, H, T, C // group]`` for token grouping (groups along channels), or
    ``[B, H, T // group, C]`` for channel grouping (groups along ``group`` consecutive tokens).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


@dataclass(frozen=True)
class GroupQuantizer:
    """Asymmetric uniform quantizer ``x ≈ zero + scale * code`` with ``code ∈ [0, 2**bits)``.

    ``grouping="token"`` shares a scale along ``group`` consecutive channels of one token;
    ``grouping="channel"`` shares it along ``group`` consecutive tokens of one channel (KIVI-style
    keys: channel outliers get their own range). Scales and zeros are stored in ``meta_dtype``, and
    the codes are computed against the *stored* (rounded) scale and zero so that dequantization
    sees exactly what was optimised for.
    """

    bits: int
    grouping: Grouping
    group: int
    meta_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.grouping not in ("token", "channel"):
            raise ValueError(f"grouping must be 'token' or 'channel', got {self.grouping!r}")
        if self.group < 1:
            raise ValueError(f"group size must be >= 1, got {self.group}")

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """View ``[B, H, T, C]`` as ``[B, H, n_groups, group, C]`` or ``[B, H, T, n_groups, group]``."""
        b, h, t, c = x.shape
        if self.grouping == "token":
            if c % self.group:
                raise ValueError(f"channel group {self.group} does not divide {c} channels")
            return x.reshape(b, h, t, c // self.group, self.group)
        if t % self.group:
            raise ValueError(f"token group {self.group} does not divide a block of {t} tokens")
        return x.reshape(b, h, t // self.group, self.group, c)

    def quantize(self, x: torch.Tensor) -> QuantizedTokens:
        """Quantize ``x`` of shape ``[B, H, T, C]`` (T a multiple of ``group`` for channel grouping)."""
        levels = (1 << self.bits) - 1
        g = self._grouped(x.float())
        reduce_dim = -1 if self.grouping == "token" else -2
        lo = g.amin(dim=reduce_dim, keepdim=True)
        hi = g.amax(dim=reduce_dim, keepdim=True)
        zero = lo.to(self.meta_dtype)
        # Divided by a tensor, not a Python number: torch's CUDA kernels multiply by the reciprocal of a
        # scalar divisor, so the scale (and the GPU kernel that must store the same bits) would depend
        # on the device. This is IEEE division everywhere. ``full`` fills on the device: no host copy.
        divisor = torch.full((), float(levels), dtype=hi.dtype, device=hi.device)
        scale = ((hi - lo) / divisor).to(self.meta_dtype)
        scale_f = scale.float()
        safe = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
        codes = torch.round((g - zero.float()) / safe).clamp_(0, levels).to(torch.uint8)
        codes = codes.reshape(x.shape)
        return QuantizedTokens(
            codes=pack_codes(codes, self.bits),
            scale=scale.squeeze(reduce_dim),
            zero=zero.squeeze(reduce_dim),
        )

    def dequantize(self, q: QuantizedTokens, n_channels: int, dtype: torch.dtype) -> torch.Tensor:
        """Dense ``[B, H, T, C]`` tensor in ``dtype`` from packed codes, scales and zeros."""
        codes = unpack_codes(q.codes, self.bits, n_channels).float()
        b, h, t, c = codes.shape
        g = self._grouped(codes)
        reduce_dim = -1 if self.grouping == "token" else -2
        out = g * q.scale.float().unsqueeze(reduce_dim) + q.zero.float().unsqueeze(reduce_dim)
        return out.reshape(b, h, t, c).to(dtype)

    def metadata_bytes_per_group(self) -> int:
        """Bytes of one group's scale plus zero point."""
        return 2 * torch.empty((), dtype=self.meta_dtype).element_size()
