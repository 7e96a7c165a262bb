"""Query-aware key bit widths: each key channel gets its own width, chosen from calibration.

A key channel's quantization error reaches the attention logits through the query: the logit error of
a key quantized per channel is ``Σ_c q_c e_c``, whose mean square is about ``Σ_c E[q_c²] E[e_c²]``, and
a ``b``-bit uniform code over a block whose channel range is ``r_c`` has ``E[e_c²] ∝ r_c² / (2^b − 1)²``.
So a channel's *weight* ``w_c = E[q_c²] E[r_c²]`` (measured by ``headq calibrate``, kept in the basis as
``key_channel_weight``) says what one step of its code costs, and the widths that minimise
``Σ_c w_c / (2^{b_c} − 1)²`` at a fixed mean width are found greedily: the error drop of each extra bit
shrinks with the width, so taking the largest drops over all channels of all layers is optimal. Layers and
heads that queries read hard get more bits, channels that queries barely use get fewer (down to one).

Storage: per layer, the channels of one width (of all KV heads) form one packed row per token, stored by a
:class:`~transformers_headq.store.QuantizedStore` of that width (per-channel scales and zeros per block, as
uniform keys); reads scatter them back to ``[B, H, T, D]``. The fused GPU kernels do not read this layout:
such layers use the reference attention path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import CacheInputError
from .quantize import GroupQuantizer, QuantizedTokens, packed_row_bytes
from .store import QuantizedStore, TokenBuffer

KEY_WIDTHS = (1, 2, 3, 4)


def allocate_key_widths(weights: Sequence[torch.Tensor], mean_bits: float) -> list[torch.Tensor]:
    """Bit widths ``[H, D]`` (int64, in ``KEY_WIDTHS``) per layer for channel weights ``[H, D]`` per layer,
    with ``mean_bits`` bits a code on average over all channels of all layers (rounded down to whole bits)."""
    low, high = KEY_WIDTHS[0], KEY_WIDTHS[-1]
    if not low <= mean_bits <= high:
        raise ValueError(f"mean key bits must be between {low} and {high}, got {mean_bits}")
    flat = torch.cat([w.detach().double().flatten() for w in weights])
    if not bool(torch.isfinite(flat).all()) or bool((flat < 0).any()):
        raise ValueError("key channel weights must be finite and non-negative")
    steps = torch.tensor(KEY_WIDTHS, dtype=torch.float64)
    noise = 1.0 / (2.0**steps - 1.0) ** 2
    drops = noise[:-1] - noise[1:]  # error drop of each extra bit, decreasing: greedy = the largest drops
    gains = flat[:, None] * drops[None, :]  # [channels, extra bits]
    extra = int(mean_bits * flat.numel()) - low * flat.numel()
    chosen = torch.zeros_like(gains, dtype=torch.bool).flatten()
    if extra > 0:
        # stable order: among equal gains, a channel's lower step first, so each channel takes a prefix
        order = torch.argsort(-gains.flatten(), stable=True)
        chosen[order[:extra]] = True
    widths = low + chosen.view(gains.shape).sum(1)
    parts, start = [], 0
    for w in weights:
        layer = widths[start : start + w.numel()].clone()
        _whole_bytes(layer, w.detach().double().flatten())
        parts.append(layer.view(w.shape).long())
        start += w.numel()
    return parts


def _whole_bytes(widths: torch.Tensor, weights: torch.Tensor) -> None:
    """Demote (in place) the least weighted channels of each width from 4 down to 2 by one bit until every
    width's row of a layer fills whole bytes, so that no bit is spent on padding (1-bit rows may still pad)."""
    for bits in KEY_WIDTHS[:0:-1]:
        mine = torch.nonzero(widths == bits).flatten()
        spare = next(s for s in range(8) if (len(mine) - s) * bits % 8 == 0)
        if spare:
            weakest = mine[torch.argsort(weights[mine], stable=True)[:spare]]
            widths[weakest] -= 1


def stored_code_bits(widths: Sequence[torch.Tensor]) -> float:
    """Mean stored bits per key code over ``widths`` (per layer), byte padding of each width's row included."""
    bits = elements = 0
    for w in widths:
        counts = torch.bincount(w.flatten(), minlength=KEY_WIDTHS[-1] + 1).tolist()
        bits += sum(8 * packed_row_bytes(n, b) for b, n in enumerate(counts) if n)
        elements += w.numel()
    return bits / elements


class MixedKeyQuantizer:
    """Quantizes a layer's keys ``[B, H, T, D]`` with per-channel widths ``[H, D]``: one
    :class:`GroupQuantizer` (channel grouping over blocks of ``block`` tokens) per width present."""

    def __init__(self, widths: torch.Tensor, block: int, meta_dtype: torch.dtype) -> None:
        if widths.dim() != 2 or not set(widths.unique().tolist()) <= set(KEY_WIDTHS):
            raise ValueError(f"key widths must be a [heads, head_dim] tensor of {KEY_WIDTHS}")
        self.widths = widths.cpu()
        self.heads, self.head_dim = widths.shape
        flat = self.widths.flatten()
        self.groups = [
            (GroupQuantizer(b, "channel", block, meta_dtype), torch.nonzero(flat == b).flatten())
            for b in KEY_WIDTHS
            if bool((flat == b).any())
        ]

    def _check(self, keys: torch.Tensor) -> None:
        if (keys.shape[1], keys.shape[3]) != (self.heads, self.head_dim):
            raise CacheInputError(
                f"the key widths are for {self.heads} KV heads of dim {self.head_dim}, but the model gives "
                f"{keys.shape[1]} heads of dim {keys.shape[3]}: wrong basis for this model"
            )

    def _rows(self, keys: torch.Tensor) -> torch.Tensor:
        """``[B, 1, T, H·D]``: every channel of a token in one row."""
        b, h, t, d = keys.shape
        return keys.permute(0, 2, 1, 3).reshape(b, 1, t, h * d)

    def quantize(self, keys: torch.Tensor) -> list[QuantizedTokens]:
        """One :class:`QuantizedTokens` per width, over that width's channels (rows ``[B, 1, T, n]``)."""
        self._check(keys)
        rows = self._rows(keys)
        return [q.quantize(rows[..., index.to(keys.device)]) for q, index in self.groups]

    def dequantize(self, parts: Sequence[QuantizedTokens], dtype: torch.dtype) -> torch.Tensor:
        """Dense keys ``[B, H, T, D]`` in ``dtype`` from the widths' parts (as :meth:`quantize` returns)."""
        first = parts[0].codes
        b, t = first.shape[0], first.shape[2]
        rows = torch.empty(b, t, self.heads * self.head_dim, dtype=dtype, device=first.device)
        for (q, index), part in zip(self.groups, parts, strict=True):
            rows[..., index.to(first.device)] = q.dequantize(part, len(index), dtype)[:, 0]
        return rows.view(b, t, self.heads, self.head_dim).permute(0, 2, 1, 3).contiguous()


class MixedKeyStore:
    """A layer's keys stored with per-channel widths: one :class:`QuantizedStore` per width."""

    def __init__(self, quantizer: MixedKeyQuantizer) -> None:
        self.quantizer = quantizer
        self.stores = [QuantizedStore(q, len(index)) for q, index in quantizer.groups]
        self.n_parts = 3 * len(self.stores)

    @property
    def length(self) -> int:
        return self.stores[0].length

    def append_encoded(self, parts: list[torch.Tensor]) -> None:
        for i, store in enumerate(self.stores):
            store.append_encoded(parts[3 * i : 3 * i + 3])

    def read(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        return self.quantizer.dequantize([store.tokens(start, end) for store in self.stores], dtype)

    def read_capacity(self, dtype: torch.dtype) -> torch.Tensor:
        return self.read(0, self.length, dtype)

    def set_length(self, length: int) -> None:
        for store in self.stores:
            store.set_length(length)

    def truncate(self, length: int) -> None:
        for store in self.stores:
            store.truncate(length)

    def drop_front(self, rows: int) -> None:
        for store in self.stores:
            store.drop_front(rows)

    def map_batch(self, fn) -> None:  # type: ignore[no-untyped-def]
        for store in self.stores:
            store.map_batch(fn)

    def buffers(self) -> list[TokenBuffer]:
        return [buf for store in self.stores for buf in store.buffers()]
