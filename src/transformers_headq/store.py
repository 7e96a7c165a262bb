"""Append-only per-layer token stores: dense or packed-quantized, growing or of fixed capacity.

A store holds one stream of ``[B, H, T, C]`` token rows (keys, values or side codes). Tokens are
appended in blocks and read back densely by token range. A growing buffer grows geometrically so
that a decode step is amortised O(1) instead of the O(cache) concatenation ``DynamicCache`` does.
A fixed-capacity buffer is allocated once for ``capacity`` rows and never moves (what CUDA graphs
and ``torch.compile``'s static addresses need); past its capacity it raises
:class:`CacheCapacityError`, and :func:`write_block_where` writes a block at a position held on the
device, predicated by a device flag, so a decode step needs no host branch.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .errors import HeadQError
from .quantize import GroupQuantizer, QuantizedTokens


class CacheCapacityError(HeadQError):
    """More tokens than a fixed-capacity cache was made for."""


def capacity_error(capacity: int, needed: int) -> CacheCapacityError:
    return CacheCapacityError(
        f"the cache was made for {capacity} tokens (max_cache_len, in whole blocks) but needs {needed}: make it "
        "with max_cache_len >= prompt length + max_new_tokens, or without max_cache_len to let it grow"
    )


def write_block_where(data: torch.Tensor, block: torch.Tensor, rows: torch.Tensor, commit: torch.Tensor) -> None:
    """Write ``rows`` ``[B, H, n, C]`` over rows ``[n·block, n·block + n)`` of ``data`` where ``commit`` (a
    one-element bool tensor) is true, leave them as they are where it is false.

    ``block`` is a one-element long tensor: the position lives on the device, so a decode step that
    may or may not complete a block needs no host branch (the old rows are written back).
    """
    n = rows.shape[2]
    blocks = data.view(*data.shape[:2], data.shape[2] // n, n, *data.shape[3:])
    old = blocks.index_select(2, block).squeeze(2)
    blocks.index_copy_(2, block, torch.where(commit, rows, old).unsqueeze(2))


class TokenBuffer:
    """A tensor growing along dim 2, with spare capacity so appends rarely reallocate.

    Rows can also be dropped from the front (sliding-window layers); the freed space is reclaimed
    at the next reallocation, which copies only the live rows, so memory stays bounded.
    """

    def __init__(self, template: torch.Tensor, capacity: int | None = None) -> None:
        """``capacity``: rows allocated once (zeros) and never exceeded; ``None``: grow as needed."""
        if capacity is None:
            self._data = template[:, :, :0].clone()
        else:
            self._data = template.new_zeros((*template.shape[:2], capacity, *template.shape[3:]))
        self.capacity = capacity
        self._start = 0
        self.length = 0
        self._view: torch.Tensor | None = None  # ``data``, kept until the rows change (read every decode step)

    @property
    def data(self) -> torch.Tensor:
        """The used part (a view, no copy)."""
        if self._view is None:
            self._view = self._data[:, :, self._start : self._start + self.length]
        return self._view

    @property
    def storage(self) -> torch.Tensor:
        """The whole allocation, used rows and spare ones (fixed-capacity reads cover all of it)."""
        return self._data

    def append(self, rows: torch.Tensor) -> None:
        new = rows.shape[2]
        if self._start + self.length + new > self._data.shape[2]:
            if self.capacity is not None:
                raise capacity_error(self.capacity, self.length + new)
            capacity = max(self.length + new, 2 * self.length, 16)
            grown = self._data.new_empty((*self._data.shape[:2], capacity, *self._data.shape[3:]))
            grown[:, :, : self.length] = self.data
            self._data, self._start = grown, 0
        end = self._start + self.length
        self._data[:, :, end : end + new] = rows
        self.length += new
        self._view = None

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
        self._view = None

    def set_length(self, length: int) -> None:
        """Host-side length of a fixed-capacity buffer whose rows were written on the device."""
        self.length = length
        self._view = None

    def drop_front(self, rows: int) -> None:
        """Forget the oldest ``rows`` rows."""
        if self.capacity is not None:
            raise ValueError("a fixed-capacity buffer keeps its rows in place; it cannot drop the oldest")
        rows = min(rows, self.length)
        self._start += rows
        self.length -= rows
        self._view = None

    def map_batch(self, fn) -> None:  # type: ignore[no-untyped-def]
        """Apply a batch-axis transform (select, repeat) to the used rows; a growing buffer drops its
        spare capacity, a fixed one keeps it."""
        self._data = fn(self._data if self.capacity is not None else self.data).contiguous()
        self._start = 0
        self._view = None

    def adopt(self, tensor: torch.Tensor) -> None:
        """Hold the rows in ``tensor`` (a fixed buffer's new home, e.g. a view of a layer's arena), after
        copying the rows held so far into it: same shape and dtype as the allocation it replaces."""
        if self.capacity is None or tensor.shape != self._data.shape or tensor.dtype != self._data.dtype:
            held = f"{tuple(self._data.shape)} {self._data.dtype}"
            raise ValueError(f"a fixed buffer of {held} cannot adopt {tuple(tensor.shape)} {tensor.dtype}")
        if self._data.device.type != "meta":
            tensor.copy_(self._data)
        self._data = tensor
        self._view = None

    def nbytes_used(self) -> int:
        d = self.data
        return d.numel() * d.element_size()

    def nbytes_allocated(self) -> int:
        return self._data.numel() * self._data.element_size()


class TokenStore(Protocol):
    """What a layer needs from a stream of cached token rows."""

    length: int

    def read(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Dense rows ``[start, end)`` as the reader sees them."""

    def truncate(self, length: int) -> None: ...

    def drop_front(self, rows: int) -> None:
        """Forget the oldest ``rows`` rows (block-aligned for quantized stores)."""

    def map_batch(self, fn) -> None: ...  # type: ignore[no-untyped-def]

    def buffers(self) -> list[TokenBuffer]: ...

    n_parts: int  # tensors an encoded block of this stream has (dense rows: 1; codes, scale, zero: 3)

    def append_encoded(self, parts: list[torch.Tensor]) -> None:
        """Store rows already encoded (``encode.encode_blocks`` makes them), ``n_parts`` tensors."""

    def read_capacity(self, dtype: torch.dtype) -> torch.Tensor:
        """Fixed capacity: every row of the allocation, as the reader sees it (unused rows too)."""

    def set_length(self, length: int) -> None:
        """Fixed capacity: the host-side length, after rows were written on the device."""


class DenseStore:
    """Rows kept exactly, in the dtype they arrive in."""

    def __init__(self, capacity: int | None = None, template: torch.Tensor | None = None) -> None:
        """``capacity`` (with a ``[B, H, *, C]`` ``template``): allocate that many rows now, once."""
        self._buf: TokenBuffer | None = None if capacity is None else TokenBuffer(template, capacity)  # type: ignore[arg-type]
        self.length = 0

    n_parts = 1

    def append_encoded(self, parts: list[torch.Tensor]) -> None:
        (rows,) = parts
        if self._buf is None:
            self._buf = TokenBuffer(rows)
        self._buf.append(rows)
        self.length = self._buf.length

    def read_capacity(self, dtype: torch.dtype) -> torch.Tensor:
        assert self._buf is not None
        return self._buf.storage.to(dtype)

    def set_length(self, length: int) -> None:
        assert self._buf is not None
        self._buf.set_length(length)
        self.length = length

    def read(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        assert self._buf is not None
        return self._buf.data[:, :, start:end].to(dtype)

    def truncate(self, length: int) -> None:
        if self._buf is not None:
            self._buf.truncate(length)
            self.length = self._buf.length

    def drop_front(self, rows: int) -> None:
        if self._buf is not None:
            self._buf.drop_front(rows)
            self.length = self._buf.length

    def map_batch(self, fn) -> None:  # type: ignore[no-untyped-def]
        if self._buf is not None:
            self._buf.map_batch(fn)

    def rows(self) -> torch.Tensor:
        """All stored rows ``[B, H, T, C]`` (a strided view, no copy), for fused kernels."""
        assert self._buf is not None
        return self._buf.data

    def buffers(self) -> list[TokenBuffer]:
        return [] if self._buf is None else [self._buf]


class QuantizedStore:
    """Rows held as packed codes plus scales and zero points (see :class:`GroupQuantizer`).

    With channel grouping the scales are per block of ``quantizer.group`` tokens, so appends,
    reads and truncations must be block-aligned; the cache layer guarantees that.
    """

    def __init__(
        self,
        quantizer: GroupQuantizer,
        n_channels: int,
        capacity: int | None = None,
        template: torch.Tensor | None = None,
    ) -> None:
        """``capacity`` (tokens, whole blocks; with a ``[B, H, *, n_channels]`` ``template`` giving batch,
        heads and device): allocate the codes, scales and zeros for that many tokens now, once."""
        self.quantizer = quantizer
        self.n_channels = n_channels
        self._codes: TokenBuffer | None = None
        self._scale: TokenBuffer | None = None
        self._zero: TokenBuffer | None = None
        self.length = 0
        if capacity is not None:
            assert template is not None
            per = self._tokens_per_scale_row
            if capacity % per:
                raise ValueError(f"capacity {capacity} is not a whole number of {per}-token blocks")
            # one quantized block gives the packed widths and metadata shapes to allocate
            shapes = self.quantizer.quantize(template.float().new_zeros(*template.shape[:2], per, n_channels))
            rows_of_meta = capacity // per
            self._codes = TokenBuffer(shapes.codes, capacity)
            self._scale = TokenBuffer(shapes.scale, rows_of_meta)
            self._zero = TokenBuffer(shapes.zero, rows_of_meta)

    @property
    def _tokens_per_scale_row(self) -> int:
        return self.quantizer.group if self.quantizer.grouping == "channel" else 1

    n_parts = 3

    def append_encoded(self, parts: list[torch.Tensor]) -> None:
        codes, scale, zero = parts
        if self._codes is None:
            self._codes, self._scale, self._zero = TokenBuffer(codes), TokenBuffer(scale), TokenBuffer(zero)
        assert self._scale is not None and self._zero is not None
        if self._codes.capacity is not None and self.length + codes.shape[2] > self._codes.capacity:
            raise capacity_error(self._codes.capacity, self.length + codes.shape[2])  # before any buffer changes
        self._codes.append(codes)
        self._scale.append(scale)
        self._zero.append(zero)
        self.length = self._codes.length

    def read_capacity(self, dtype: torch.dtype) -> torch.Tensor:
        assert self._codes is not None and self._scale is not None and self._zero is not None
        q = QuantizedTokens(self._codes.storage, self._scale.storage, self._zero.storage)
        return self.quantizer.dequantize(q, self.n_channels, dtype)

    def set_length(self, length: int) -> None:
        assert self._codes is not None and self._scale is not None and self._zero is not None
        self._check_aligned(length)
        self._codes.set_length(length)
        self._scale.set_length(-(-length // self._tokens_per_scale_row))
        self._zero.set_length(-(-length // self._tokens_per_scale_row))
        self.length = length

    def _check_aligned(self, *positions: int) -> None:
        per = self._tokens_per_scale_row
        for p in positions:
            if p % per and p != self.length:
                raise ValueError(f"position {p} is not aligned to the {per}-token quantization blocks")

    def tokens(self, start: int, end: int) -> QuantizedTokens:
        """Codes, scales and zeros of slots ``[start, end)`` (block-aligned views, no copy)."""
        assert self._codes is not None and self._scale is not None and self._zero is not None
        self._check_aligned(start, end)
        per = self._tokens_per_scale_row
        s0, s1 = start // per, -(-end // per)
        return QuantizedTokens(
            codes=self._codes.data[:, :, start:end],
            scale=self._scale.data[:, :, s0:s1],
            zero=self._zero.data[:, :, s0:s1],
        )

    def read(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        return self.quantizer.dequantize(self.tokens(start, end), self.n_channels, dtype)

    def truncate(self, length: int) -> None:
        if self._codes is None:
            return
        assert self._scale is not None and self._zero is not None
        self._check_aligned(length)
        per = self._tokens_per_scale_row
        self._codes.truncate(length)
        self._scale.truncate(-(-length // per))
        self._zero.truncate(-(-length // per))
        self.length = self._codes.length

    def drop_front(self, rows: int) -> None:
        if self._codes is None:
            return
        assert self._scale is not None and self._zero is not None
        per = self._tokens_per_scale_row
        if rows % per:
            raise ValueError(f"can only drop whole {per}-token quantization blocks, not {rows} tokens")
        self._codes.drop_front(rows)
        self._scale.drop_front(rows // per)
        self._zero.drop_front(rows // per)
        self.length = self._codes.length

    def map_batch(self, fn) -> None:  # type: ignore[no-untyped-def]
        for buf in self.buffers():
            buf.map_batch(fn)

    def packed(self) -> QuantizedTokens:
        """All stored codes, scales and zeros (strided views, no copy), for fused kernels."""
        assert self._codes is not None and self._scale is not None and self._zero is not None
        return QuantizedTokens(self._codes.data, self._scale.data, self._zero.data)

    def buffers(self) -> list[TokenBuffer]:
        return [b for b in (self._codes, self._scale, self._zero) if b is not None]
