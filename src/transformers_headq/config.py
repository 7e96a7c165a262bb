"""Cache settings and exact budget accounting (bits per cached element, everything counted)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .quantize import Grouping, GroupQuantizer, check_bits, packed_row_bytes

SideScale = Literal["token", "block"]
ValuePolicy = Literal["a2", "position"]
_META_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class HeadQConfig:
    """How a :class:`~transformers_headq.HeadQCache` stores keys, values and side codes.

    Tokens arrive in a full-precision window and are quantized ``block_size`` at a time (KIVI's
    residual window). ``None`` bits keep a stream unquantized, so ``key_bits=None,
    value_bits=None, rank=0`` is an exact ``DynamicCache``.

    Attributes:
        key_bits: bits per key code, or ``None`` for full-precision keys.
        key_grouping: ``"channel"`` (KIVI: one scale per channel per block of ``block_size``
            tokens) or ``"token"`` (one scale per ``channel_group`` channels of each token).
        value_bits: bits per value code, or ``None`` (K-only mode, dense values).
        value_grouping: grouping of value codes, ``"token"`` as in KIVI.
        channel_group: channels per group for token grouping (``None``: the whole head).
        block_size: tokens quantized together; the full-precision window holds fewer.
        rank: side-code rank per KV head (``None``: the basis' rank; ``0``: no side code).
        side_bits: bits per side-code entry, or ``None`` to keep it unquantized (lossless).
        side_scale: ``"token"`` (a scale and zero per token and head over its ``rank`` entries)
            or ``"block"`` (per basis direction, shared by the ``block_size`` tokens of a block).
        meta_dtype: dtype of stored scales and zero points.
        value_keep: value tokens per block and KV head kept in full precision beside the codes
            (the A² value policy; 0 turns it off).
        value_policy: how the kept tokens are chosen: ``"a2"``, the largest mean ``p²`` over the
            queries that read the block before it was quantized, or ``"position"`` (a control:
            the first ``value_keep`` tokens of each block).
        sink_keys: the first ``sink_keys`` keys of each sequence are also held in the model dtype, and
            attention reads them exact (no side code): the attention sink that most heads put their
            mass on. Its 2-bit error moves every query's softmax normaliser, the more so the longer the
            context (README, "Attention-sink keys"). Must lie in the first block. One by default: on the
            default model one exact key is as good as four, and costs ``16 / T`` bits per key element over
            ``T`` tokens. With dense keys (``key_bits=None``) it is 0: those keys are exact already.
        mixed_key_bits: mean bits per key code with query-aware per-channel widths (1 to 4 bits, from
            the basis' ``key_channel_weight``, allocated over all layers; see :mod:`.mixed_keys`), or
            ``None``: every channel gets ``key_bits``. Needs channel-grouped keys and a basis calibrated
            with key weights; read by the reference attention path (no fused kernel, no fixed-capacity cache).
        track_attention: accumulate ``Σ p²`` per cached token for every token (a diagnostic).
        chunk_size: cached tokens processed at once by the reference attention path.
    """

    key_bits: int | None = 2
    key_grouping: Grouping = "channel"
    value_bits: int | None = None
    value_grouping: Grouping = "token"
    channel_group: int | None = None
    block_size: int = 64
    rank: int | None = None
    side_bits: int | None = 4
    side_scale: SideScale = "token"
    meta_dtype: str = "float16"
    value_keep: int = 0
    value_policy: ValuePolicy = "a2"
    sink_keys: int = 1
    mixed_key_bits: float | None = None
    track_attention: bool = False
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits", "side_bits"):
            bits = getattr(self, name)
            if bits is not None:
                try:
                    check_bits(bits)
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None
        for name in ("key_grouping", "value_grouping"):
            if getattr(self, name) not in ("token", "channel"):
                raise ValueError(f"{name} must be 'token' or 'channel', got {getattr(self, name)!r}")
        if self.side_scale not in ("token", "block"):
            raise ValueError(f"side_scale must be 'token' or 'block', got {self.side_scale!r}")
        if self.meta_dtype not in _META_DTYPES:
            raise ValueError(f"meta_dtype must be one of {sorted(_META_DTYPES)}, got {self.meta_dtype!r}")
        if self.block_size < 1 or self.chunk_size < 1:
            raise ValueError("block_size and chunk_size must be >= 1")
        if self.value_policy not in ("a2", "position"):
            raise ValueError(f"value_policy must be 'a2' or 'position', got {self.value_policy!r}")
        if not 0 <= self.value_keep <= self.block_size:
            raise ValueError(f"value_keep must be between 0 and block_size={self.block_size}, got {self.value_keep}")
        if self.value_keep and self.value_bits is None:
            raise ValueError("value_keep needs quantized values (value_bits); dense values are already exact")
        if not 0 <= self.sink_keys <= self.block_size:
            raise ValueError(f"sink_keys must be between 0 and block_size={self.block_size}, got {self.sink_keys}")
        if self.key_bits is None:  # dense keys are exact: no copy of the first ones (nor its bytes)
            object.__setattr__(self, "sink_keys", 0)
        if self.mixed_key_bits is not None:
            if self.key_bits is None or self.key_grouping != "channel":
                raise ValueError("mixed_key_bits needs quantized, channel-grouped keys (key_grouping='channel')")
            if not 1 <= self.mixed_key_bits <= 4:
                raise ValueError(f"mixed_key_bits must be between 1 and 4, got {self.mixed_key_bits}")
        if self.rank is not None and self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")

    def replace(self, **changes: Any) -> HeadQConfig:
        """A copy with some fields changed (unknown names raise a clear error)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown HeadQConfig settings: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadQConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def meta_torch_dtype(self) -> torch.dtype:
        return _META_DTYPES[self.meta_dtype]

    # Quantizers for each stream, shared by the cache and the budget so the two cannot disagree.
    def _quantizer(self, bits: int, grouping: Grouping, n_channels: int) -> GroupQuantizer:
        group = self.block_size if grouping == "channel" else (self.channel_group or n_channels)
        return GroupQuantizer(bits, grouping, group, self.meta_torch_dtype)

    def key_quantizer(self, head_dim: int) -> GroupQuantizer | None:
        return None if self.key_bits is None else self._quantizer(self.key_bits, self.key_grouping, head_dim)

    def value_quantizer(self, head_dim: int) -> GroupQuantizer | None:
        if self.value_bits is None:
            return None
        return self._quantizer(self.value_bits, self.value_grouping, head_dim)

    def side_quantizer(self, rank: int) -> GroupQuantizer | None:
        if self.side_bits is None or rank == 0:
            return None
        grouping: Grouping = "token" if self.side_scale == "token" else "channel"
        group = rank if grouping == "token" else self.block_size
        return GroupQuantizer(self.side_bits, grouping, group, self.meta_torch_dtype)


@dataclass(frozen=True)
class BitsPerElement:
    """Stored bits per cached key element and per value element, everything counted."""

    key: float
    value: float

    @property
    def total(self) -> float:
        return (self.key + self.value) / 2


def _stream_bytes(
    quantizer: GroupQuantizer | None, tokens: int, channels: int, dense_bytes: int, code_bits: float | None = None
) -> float:
    """Bytes one head spends on ``tokens`` rows of ``channels`` channels (codes of ``code_bits`` bits on
    average where given: per-channel widths, whose rows span all heads of a layer)."""
    if quantizer is None:
        return tokens * channels * dense_bytes
    if code_bits is None:
        codes: float = tokens * packed_row_bytes(channels, quantizer.bits)
    else:
        codes = tokens * channels * code_bits / 8
    if quantizer.grouping == "token":
        groups = tokens * channels // quantizer.group
    else:
        groups = -(-tokens // quantizer.group) * channels
    return codes + groups * quantizer.metadata_bytes_per_group()


def cache_bytes_per_head(
    config: HeadQConfig, head_dim: int, rank: int, seq_len: int, dtype: torch.dtype, key_code_bits: float | None = None
) -> tuple[float, float]:
    """Exact (key bytes, value bytes) one sequence and KV head holds after ``seq_len`` tokens.

    With per-channel key widths the bytes of key codes are shared by a layer's heads: ``key_code_bits``
    (:func:`~transformers_headq.mixed_keys.stored_code_bits` of the allocation, byte padding included) makes
    them exact; without it they are counted at ``mixed_key_bits``."""
    dense = torch.empty((), dtype=dtype).element_size()
    quantized = (seq_len // config.block_size) * config.block_size
    window = seq_len - quantized
    if config.mixed_key_bits is not None and key_code_bits is None:
        key_code_bits = config.mixed_key_bits
    key = _stream_bytes(config.key_quantizer(head_dim), quantized, head_dim, dense, key_code_bits)
    key += window * head_dim * dense
    key += min(config.sink_keys, quantized) * head_dim * dense  # exact sink keys beside their codes
    if rank:
        key += _stream_bytes(config.side_quantizer(rank), quantized, rank, dense)
    value = _stream_bytes(config.value_quantizer(head_dim), quantized, head_dim, dense) + window * head_dim * dense
    if config.value_keep:
        # kept tokens: values in the model dtype plus an int16 offset inside their block
        value += (quantized // config.block_size) * config.value_keep * (head_dim * dense + 2)
        if config.value_policy == "a2":
            value += window * 4  # the float32 Σp² of window tokens the policy still has to rank
    if config.track_attention:
        value += seq_len * 4  # the float32 Σp² accumulator
    return key, value


def bits_per_element(
    config: HeadQConfig,
    head_dim: int,
    rank: int,
    seq_len: int,
    dtype: torch.dtype = torch.float16,
    key_code_bits: float | None = None,
) -> BitsPerElement:
    """Bits per cached key and value element for one head after ``seq_len`` tokens.

    Counts codes, scales, zero points, side codes and their scales, the full-precision window and
    sink keys (in ``dtype``, the model's), and the attention accumulator when tracked. ``key_code_bits``:
    see :func:`cache_bytes_per_head`.
    """
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    key, value = cache_bytes_per_head(config, head_dim, rank, seq_len, dtype, key_code_bits)
    elements = seq_len * head_dim
    return BitsPerElement(key=8 * key / elements, value=8 * value / elements)
