"""Fused GPU kernels (Triton, and one in CUDA C++) for the ``headq`` cache and attention, with the torch path
as their oracle.

Decode steps (one query token per sequence) over packed stores whose settings :func:`decode_supports` says
the kernels cover run the CUDA kernel (``cuda_decode``) where it applies (the default settings on head dim 128),
else the Triton kernels (:func:`triton_decode_attention`). These are leaves: they take tensors and settings,
and know nothing of caches (``fused_decode.py`` reads a layer's stores for them and picks the kernel).
:func:`encode_blocks` and :func:`commit_block` (its predicated, in-place form) encode whole blocks of
keys, side code and values in one launch; :func:`quantize_pack` quantizes and packs one stream, for
settings the block kernel does not cover. Key and value codes are bit for bit the torch
quantizer's. Triton is imported only when a kernel is first needed (``pip install
transformers-headq[gpu]``). ``HEADQ_KERNELS=0`` turns the kernels off; on CPU they run only under
``TRITON_INTERPRET=1`` (the tests do that).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..quantize import GroupQuantizer, QuantizedTokens, packed_row_bytes
from . import cuda_decode
from .launch import CachedLauncher, LaunchSite, launch_device, sm_count

# A layer's key, side-code and value quantizers (``None``: that stream is stored dense).
Quantizers = tuple[GroupQuantizer | None, GroupQuantizer | None, GroupQuantizer | None]


class StoredTensors(NamedTuple):
    """A fixed-capacity layer's tensors, split by stream: each stream's codes, scale and zero (or its one
    tensor of dense rows); ``side`` is empty, ``encoder`` and ``decoder`` ``None``, without a side code."""

    keys: list[torch.Tensor]
    side: list[torch.Tensor]
    values: list[torch.Tensor]
    encoder: torch.Tensor | None
    decoder: torch.Tensor | None


def split_stored(tensors: list[torch.Tensor], key_parts: int, side_parts: int, value_parts: int) -> StoredTensors:
    """Split a fixed layer's tensors, in the order its arena holds them: the key stream's ``key_parts``
    tensors, the side code's ``side_parts`` (0: none), the values' ``value_parts``, then the encoder and
    decoder when there is a side code. (3 parts: codes, scale, zero; 1: dense rows.)"""
    side_start, value_start = key_parts, key_parts + side_parts
    end = value_start + value_parts
    encoder, decoder = tensors[end : end + 2] if side_parts else (None, None)
    return StoredTensors(
        tensors[:side_start], tensors[side_start:value_start], tensors[value_start:end], encoder, decoder
    )


_PLANE_BITS = (2, 4, 8)  # codes a byte holds in at most four planes (the kernel's unrolled planes)
# Launch settings of the split kernel, from the H100 sweeps in benchmarks/records/kernel-tuning-h100-v8-planes.txt and
# the A/B in benchmarks/records/kernel-ab-h100.txt. tile: tokens a loop step; programs_per_sm: how many splits to
# aim for; min_split_tokens: the fewest tokens a split gets; asm: the PTX code conversion (0: Triton's integer-to-float,
# measured 1.7x slower); maxnreg: a register cap (0: none; caps spilled and were slower); min_rows: the fewest query
# rows a program's products have (the query heads sharing a KV head, padded to a power of two; Triton pads them to
# the tensor cores' 16 rows itself, but work on padding rows in registers is wasted). One warp with 8 rows was the
# fastest at batch 8 (32k: 0.230 against 0.242 ms for two warps with 16 rows; 128k: 0.735 against 0.776 ms), two
# warps with 16 rows at 32k x 32 (0.866 against 0.967 ms): one setting is kept, the better one at batch 8.
LAUNCH = {
    "num_warps": 1, "num_stages": 3, "tile": 64, "programs_per_sm": 16, "asm": 1, "maxnreg": 0, "min_split_tokens": 256,
    "min_rows": 8,
}  # fmt: skip
# The Triton dtype (a name in triton.language) of each torch dtype: kernel operands, stored metadata.
_OPERAND_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
last_compiled = None  # the most recent compiled split kernel (registers, spills: see the benchmark)


# Looked up once, at import: kernels_enabled runs inside compiled decode steps, where a lookup cannot.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def kernels_enabled(device: torch.device) -> bool:
    """Whether fused kernels may run for tensors on ``device`` (checked at every decode step: kept cheap)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _TRITON_INSTALLED and os.environ.get("HEADQ_KERNELS", "1") != "0"


@functools.cache
def _smallest_dot_rows() -> int:
    """Fewest rows a ``tl.dot`` operand may have: Triton pads smaller products itself from version 3.5."""
    import triton

    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return 1 if (major, minor) >= (3, 5) else 16


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _plane_fits(head_dim: int, bits: int | None) -> bool:
    """Packed codes of a head row split into ``8 // bits`` planes of at least 16 channels (a dot's depth)."""
    return bits is None or (bits in _PLANE_BITS and head_dim * bits // 8 >= 16)


def decode_supports(quantizers: Quantizers, rank: int, block: int, head_dim: int) -> bool:
    """Whether the decode kernel covers stores of these settings: channel-grouped packed keys on blocks of
    ``block`` tokens, a side code of at most 128 packed directions, per-token values over the whole head
    (or dense values)."""
    key_q, side_q, value_q = quantizers
    return (
        key_q is not None
        and key_q.grouping == "channel"
        and _power_of_two(block)
        and _power_of_two(head_dim)
        and _plane_fits(head_dim, key_q.bits)
        and (rank == 0 or (side_q is not None and side_q.bits in _PLANE_BITS and rank <= 128))
        and (value_q is None or (value_q.grouping == "token" and value_q.group == head_dim))
        and _plane_fits(head_dim, None if value_q is None else value_q.bits)
    )


def key_validity(mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """``[B, K]`` key validity (uint8) from a decode mask ``[B, 1, 1, K]`` (bool); ``mask`` must be covered."""
    if mask is None:
        return None
    return mask[:, 0, 0, :].expand(batch, kv_len).view(torch.uint8)


def mask_covered(mask: torch.Tensor | None, kv_len: int) -> bool:
    """Whether the kernel reads this mask: none, or a boolean key mask ``[B, 1, 1, K]`` shared by the heads."""
    return mask is None or (
        mask.dtype == torch.bool and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[-1] == kv_len
    )


@dataclass(frozen=True)
class DecodeSettings:
    """What the decode kernel is specialised on: the stores' settings and the head layout."""

    quantizers: Quantizers
    rank: int
    block: int
    kv_heads: int
    head_dim: int
    q_heads: int
    dtype: torch.dtype

    @functools.cached_property
    def cuda_covered(self) -> bool:
        """Whether the CUDA kernel reads stores of these settings (asked at every decode step: kept here)."""
        return cuda_decode.settings_covered(self)


class _DecodePlan:
    """What fused decode launches of one :class:`DecodeSettings` keep from step to step: launch sites.

    Made on the first fused decode step of those settings and kept in :data:`_PLANS` (every layer of a
    model shares one); made again if :data:`LAUNCH` changes (the tuning scripts do that).
    """

    def __init__(self, settings: DecodeSettings, device: torch.device) -> None:
        import triton
        import triton.language as tl

        from .decode import headq_decode_kernel, headq_merge_kernel

        key_q, side_q, value_q = settings.quantizers
        assert key_q is not None
        self.launch = tuple(LAUNCH.values())
        self.kv_heads, self.head_dim = settings.kv_heads, settings.head_dim
        self.groups = settings.q_heads // self.kv_heads
        self.block_g = max(LAUNCH["min_rows"], _smallest_dot_rows(), triton.next_power_of_2(self.groups))
        self.value_bits = 0 if value_q is None else value_q.bits
        side_bits = 8 if side_q is None else side_q.bits
        side_per_token = side_q is not None and side_q.grouping == "token"
        self.side_bytes = packed_row_bytes(settings.rank, side_bits)
        self._constexprs = {
            "H_KV": self.kv_heads, "G": self.groups, "BLOCK_G": self.block_g, "D": self.head_dim, "R": settings.rank,
            "SIDE_BYTES": self.side_bytes, "SIDE_NB": max(16, triton.next_power_of_2(self.side_bytes)),
            "KEY_BITS": key_q.bits, "SIDE_BITS": side_bits, "SIDE_PER_TOKEN": side_per_token,
            "VALUE_BITS": self.value_bits, "BLOCK_N": settings.block, "TILE": min(LAUNCH["tile"], settings.block),
            "ASM": bool(LAUNCH["asm"]) and device.type == "cuda",  # bit tricks need a GPU (not the interpreter)
            "OP_DTYPE": getattr(tl, _OPERAND_DTYPES[settings.dtype]), "DEVICE_LENGTHS": False,
        }  # fmt: skip
        self._options = {"num_warps": LAUNCH["num_warps"], "num_stages": LAUNCH["num_stages"]}
        if LAUNCH["maxnreg"]:  # a register cap, for more programs per SM
            self._options["maxnreg"] = LAUNCH["maxnreg"]
        self._sites: dict[tuple[bool, bool, bool], LaunchSite] = {}
        self.decode = CachedLauncher(headq_decode_kernel)
        self.merge = CachedLauncher(headq_merge_kernel)
        self._merge_sites: dict[int, LaunchSite] = {}

    def decode_site(self, has_mask: bool, has_softcap: bool, has_sinks: bool) -> LaunchSite:
        """The split kernel's launch site for a step with or without a padding mask, soft-capping and sink keys."""
        key = (has_mask, has_softcap, has_sinks)
        site = self._sites.get(key)
        if site is None:
            constexprs = {**self._constexprs, "HAS_MASK": has_mask, "SOFTCAP": has_softcap, "HAS_SINKS": has_sinks}
            site = self._sites[key] = LaunchSite(self.decode.kernel, constexprs, self._options)
        return site

    def merge_site(self, splits_pad: int) -> LaunchSite:
        """The merge kernel's launch site for up to ``splits_pad`` splits (a power of two)."""
        site = self._merge_sites.get(splits_pad)
        if site is None:
            constexprs = {"G": self.groups, "BLOCK_G": self.block_g, "D": self.head_dim, "S_PAD": splits_pad,
                          "CHUNK": min(splits_pad, 16)}  # fmt: skip
            site = self._merge_sites[splits_pad] = LaunchSite(self.merge.kernel, constexprs, {})
        return site


_PLANS: dict[tuple[DecodeSettings, torch.device], _DecodePlan] = {}
_WORKSPACE: dict[tuple[torch.device, int], torch.Tensor] = {}
# A fixed-capacity layer's device state: quantized tokens, window tokens, overflow flag, then the CUDA decode
# kernel's counters (an int64 entry a sequence and KV head: its int32 counts of finished splits and claimed tiles).
STATE_COUNTS = 3


def state_entries(batch_heads: int) -> int:
    """Entries (int64) of a fixed-capacity layer's state for ``batch_heads`` (sequence, KV head) pairs."""
    return STATE_COUNTS + batch_heads


def split_partials(buf: torch.Tensor, rows: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split partials (running max, normaliser, output) of ``rows`` rows, as views of one float32 buffer."""
    return buf[:rows], buf[rows : 2 * rows], buf[2 * rows : rows * (head_dim + 2)]


def _partials(device: torch.device, rows: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split-kernel partials (running max, normaliser, output) of ``rows`` rows, from a buffer kept for reuse.

    Every layer's decode step writes them and its merge reads them before the next launch on the same
    stream, so one buffer a device and stream serves all layers and steps (no allocation per step); it
    grows to the largest step seen. (Caches decoding on other streams at the same time get their own.)
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    needed = rows * (head_dim + 2)
    buf = _WORKSPACE.get((device, stream))
    if buf is None or buf.numel() < needed:
        buf = _WORKSPACE[(device, stream)] = torch.empty(needed, device=device, dtype=torch.float32)
    return split_partials(buf, rows, head_dim)


def triton_decode_attention(
    settings: DecodeSettings,
    query: torch.Tensor,
    decoder: torch.Tensor | None,
    keys: QuantizedTokens,
    side: QuantizedTokens | None,
    values: QuantizedTokens | torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    sink_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output ``[B, 1, Hq, D]`` in the query's dtype for one decode step over packed stores.

    ``keys``/``side``/``values``: the stored tokens' codes, scales and zeros ``[B, H, T, *]`` (``values``
    may be dense rows), ``side`` and ``decoder`` ``None`` without a side code; ``window_*``: the exact
    recent tokens after them; ``mask``: ``None`` or a boolean key mask ``[B, 1, 1, T + window]``;
    ``sink_keys``: ``None`` or the exact keys ``[B, H, S, D]`` that the first ``S`` stored slots read
    (no side code there).
    Two Triton launches: the split kernel (stored tokens, and the window in the last split) and the merge of
    the splits' partial softmaxes, which writes the output in the layout and dtype the model's attention
    returns (no transpose or cast after it). The caller checks :func:`decode_supports` first (and takes the
    CUDA kernel, ``cuda_decode``, where it covers the settings).
    """
    batch, q_heads, _, head_dim = query.shape
    n_tokens = keys.codes.shape[2]
    valid = key_validity(mask, batch, n_tokens + window_keys.shape[2])
    plan = _PLANS.get((settings, query.device))
    if plan is None or plan.launch != tuple(LAUNCH.values()):
        plan = _PLANS[(settings, query.device)] = _DecodePlan(settings, query.device)
    if side is not None:
        assert decoder is not None
        # the kernel steps side-code rows by their width, a constant, so that it can load them in vectors
        assert side.codes.stride(2) == plan.side_bytes and side.codes.stride(3) == 1 and decoder.is_contiguous()
    else:
        decoder, side = query, keys  # not read when R == 0
    if isinstance(values, torch.Tensor):
        value_codes = value_scale = value_zero = values
    else:
        value_codes, value_scale, value_zero = values.codes, values.scale, values.zero
    with launch_device(query.device):  # a layer of a split model may live on another GPU
        n_splits, per_split = _splits(batch * plan.kv_heads, n_tokens, settings.block, query.device)
        rows = batch * plan.kv_heads * n_splits * plan.block_g
        m, norm, acc = _partials(query.device, rows, head_dim)
        validity = valid if valid is not None else m
        compiled = plan.decode(
            (batch * plan.kv_heads, n_splits, 1),
            plan.decode_site(valid is not None, softcap is not None, sink_keys is not None),
            (
                query, decoder,
                keys.codes, keys.scale, keys.zero,
                side.codes, side.scale, side.zero,
                value_codes, value_scale, value_zero,
                window_keys, window_values,
                sink_keys if sink_keys is not None else query,  # not read without sinks
                validity,
                m,  # lengths: not read without DEVICE_LENGTHS
                m, norm, acc,
                n_tokens, window_keys.shape[2], per_split, scaling, softcap or 0.0,
                query.stride(0), query.stride(1),
                *_bht(keys.codes), *_bht(keys.scale),
                side.codes.stride(0), side.codes.stride(1), *_bht(side.scale),
                *_bht(value_codes), *_bht(value_scale),
                *_bht(window_keys), *_bht(window_values),
                validity.stride(0) if valid is not None else 0,
                *((sink_keys.shape[2], *_bht(sink_keys)) if sink_keys is not None else (0, 0, 0, 0)),
            ),
        )  # fmt: skip
        global last_compiled
        last_compiled = compiled
        out = torch.empty(batch, 1, q_heads, head_dim, device=query.device, dtype=query.dtype)
        splits_pad = max(2, 1 << (n_splits - 1).bit_length())
        plan.merge((batch * plan.kv_heads, plan.groups, 1), plan.merge_site(splits_pad), (m, norm, acc, out, n_splits))
    return out


def _splits(batch_heads: int, n_tokens: int, block: int, device: torch.device) -> tuple[int, int]:
    """``(splits, tokens per split)``: enough programs to fill the GPU a few times over (flash-decoding)."""
    sms = sm_count(device)
    blocks = -(-n_tokens // block)
    wanted = max(1, min(blocks, -(-LAUNCH["programs_per_sm"] * sms // batch_heads)))
    # each split also loads the query and writes partials: give it enough tokens to amortise that
    per_split = max(-(-blocks // wanted), -(-LAUNCH["min_split_tokens"] // block)) * block
    return -(-n_tokens // per_split), per_split


def _bht(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and token strides of a ``[B, H, T, C]`` (strided) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def quantize_pack(quantizer: GroupQuantizer, x: torch.Tensor) -> QuantizedTokens | None:
    """``quantizer.quantize(x)`` by the GPU kernel, or ``None`` where it does not apply.

    Only on CUDA: on CPU the torch quantizer is as fast as the interpreter is slow (the tests call
    :func:`group_quantize` directly to check the kernel there).
    """
    if x.device.type != "cuda" or not kernels_enabled(x.device) or not pack_supports(quantizer, x.shape):
        return None
    return group_quantize(quantizer, x)


def pack_supports(quantizer: GroupQuantizer, shape: torch.Size) -> bool:
    """Whether the quantize-and-pack kernel covers this quantizer on states of ``shape`` ``[B, H, T, C]``."""
    tokens, channels = shape[2], shape[3]
    if quantizer.bits not in _PLANE_BITS or tokens == 0:
        return False
    if quantizer.grouping == "channel":  # one block of tokens a program
        return _power_of_two(quantizer.group) and quantizer.group <= 256 and tokens % quantizer.group == 0
    return quantizer.group == channels  # a scale per token over all its channels


def group_quantize(quantizer: GroupQuantizer, x: torch.Tensor) -> QuantizedTokens:
    """Launch the quantize-and-pack kernel on ``x`` ``[B, H, T, C]`` (see :func:`pack_supports`)."""
    import triton
    import triton.language as tl

    from .pack import group_quantize_kernel

    batch, heads, tokens, channels = x.shape
    rows = x.reshape(batch * heads, tokens, channels)
    if rows.stride(2) != 1:
        rows = rows.contiguous()
    n_bytes = packed_row_bytes(channels, quantizer.bits)
    codes = torch.empty(batch, heads, tokens, n_bytes, dtype=torch.uint8, device=x.device)
    per_channel = quantizer.grouping == "channel"
    tile = quantizer.group if per_channel else 64
    meta_shape = (batch, heads, tokens // tile, channels) if per_channel else (batch, heads, tokens, 1)
    scale = torch.empty(meta_shape, dtype=quantizer.meta_dtype, device=x.device)
    zero = torch.empty_like(scale)
    with launch_device(x.device):
        group_quantize_kernel[(batch * heads, triton.cdiv(tokens, tile))](
            rows, codes, scale, zero,
            tokens, rows.stride(0), rows.stride(1), tokens * n_bytes, n_bytes,
            scale.shape[2] * scale.shape[3], scale.shape[3],
            C=channels, NB=n_bytes, NB_PAD=triton.next_power_of_2(n_bytes), BITS=quantizer.bits, ROWS=tile,
            PER_CHANNEL=per_channel, META_DTYPE=getattr(tl, _OPERAND_DTYPES[quantizer.meta_dtype]),
        )  # fmt: skip
        return QuantizedTokens(codes, scale, zero)


# ------------------------------------------------------------ block encoding
def _block_tile_fits(quantizer: GroupQuantizer | None, channels: int, block: int, padded: int) -> bool:
    """Whether the block kernel quantizes this stream: dense, or planar bits grouped over the block's
    tokens or over all of a token's channels (``padded``: the channels the packed row spans)."""
    if quantizer is None:
        return True
    whole = quantizer.group == block if quantizer.grouping == "channel" else quantizer.group == channels
    per_byte = 8 // quantizer.bits if quantizer.bits in _PLANE_BITS else 0
    packed = packed_row_bytes(channels, quantizer.bits)
    return whole and bool(per_byte) and packed * per_byte == padded and packed & (packed - 1) == 0


def block_encode_supports(quantizers: Quantizers, rank: int, block: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether :func:`encode_blocks` / :func:`commit_block` cover these settings (else: the torch path)."""
    key_q, side_q, value_q = quantizers
    if key_q is None or dtype not in _OPERAND_DTYPES or not (_power_of_two(block) and block >= 16):
        return False
    if not (_power_of_two(head_dim) and head_dim >= 16):
        return False
    side_ok = rank == 0 or (rank <= 128 and _block_tile_fits(side_q, rank, block, _side_width(side_q, rank)))
    return (
        _block_tile_fits(key_q, head_dim, block, head_dim)
        and side_ok
        and _block_tile_fits(value_q, head_dim, block, head_dim)
    )


def _side_width(side_q: GroupQuantizer | None, rank: int) -> int:
    """Side-code columns a tile spans: the packed row's codes (or ``rank`` rounded to a power of two, dense)."""
    if side_q is None or side_q.bits not in _PLANE_BITS:
        return 1 << (rank - 1).bit_length()
    return packed_row_bytes(rank, side_q.bits) * (8 // side_q.bits)


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[B, H, T, C]`` with (batch, head) addressable by one stride and unit channel stride."""
    if t.stride(3) != 1 or t.stride(0) != t.shape[1] * t.stride(1):
        t = t.contiguous()
    return t


def _launch_block_encode(
    keys: torch.Tensor,
    values: torch.Tensor,
    encoder: torch.Tensor | None,
    quantizers: Quantizers,
    outputs: list[torch.Tensor],
    block: int,
    target: torch.Tensor | None,
    commit: torch.Tensor | None,
) -> None:
    import triton.language as tl

    from .block_encode import encode_block_kernel

    key_q, side_q, value_q = quantizers
    assert key_q is not None
    batch, heads, tokens, head_dim = keys.shape
    rank = 0 if encoder is None else encoder.shape[-1]
    keys, values = _rows_of(keys), _rows_of(values)
    parts = iter(outputs)
    kc, ks, kz = next(parts), next(parts), next(parts)
    sc = ss = sz = kc  # placeholders, not read without a side code
    if rank:
        sc = next(parts)
        ss, sz = (next(parts), next(parts)) if side_q is not None else (sc, sc)
    vc = next(parts)
    vs, vz = (next(parts), next(parts)) if value_q is not None else (vc, vc)
    side_width = _side_width(side_q, rank) if rank else 16
    enc = encoder if encoder is not None else keys
    flag = commit if commit is not None else kc
    with launch_device(keys.device):
        encode_block_kernel[(batch * heads, tokens // block)](
            keys, values, enc, target if target is not None else flag, flag,
            kc, ks, kz, sc, ss, sz, vc, vs, vz,
            keys.stride(1), keys.stride(2), values.stride(1), values.stride(2),
            enc.stride(0), enc.stride(1), enc.stride(2) if encoder is not None else 0,
            kc.stride(1), kc.stride(2), ks.stride(1), ks.stride(2),
            sc.stride(1), sc.stride(2), ss.stride(1), ss.stride(2),
            vc.stride(1), vc.stride(2), vs.stride(1), vs.stride(2),
            H=heads, D=head_dim, R=rank, R_PAD=side_width, R_DOT=max(16, side_width), BLOCK=block,
            KEY_BITS=key_q.bits, KEY_PER_CHANNEL=key_q.grouping == "channel",
            SIDE_BITS=0 if side_q is None else side_q.bits,
            SIDE_PER_CHANNEL=side_q is not None and side_q.grouping == "channel",
            VALUE_BITS=0 if value_q is None else value_q.bits,
            VALUE_PER_CHANNEL=value_q is not None and value_q.grouping == "channel",
            MODEL_DTYPE=getattr(tl, _OPERAND_DTYPES[keys.dtype]),
            META_DTYPE=getattr(tl, _OPERAND_DTYPES[key_q.meta_dtype]),
            HAS_TARGET=target is not None, enable_fp_fusion=False,
        )  # fmt: skip


def _encoded_like(quantizer: GroupQuantizer | None, x: torch.Tensor, channels: int, block: int) -> list[torch.Tensor]:
    """Empty outputs of one stream for the tokens of ``x`` ``[B, H, T, *]``: codes, scale, zero or dense rows."""
    batch, heads, tokens = x.shape[:3]
    if quantizer is None:
        return [x.new_empty(batch, heads, tokens, channels)]
    rows = tokens // block if quantizer.grouping == "channel" else tokens
    meta = (batch, heads, rows, channels if quantizer.grouping == "channel" else 1)
    codes = torch.empty(
        batch, heads, tokens, packed_row_bytes(channels, quantizer.bits), dtype=torch.uint8, device=x.device
    )
    return [codes, x.new_empty(meta, dtype=quantizer.meta_dtype), x.new_empty(meta, dtype=quantizer.meta_dtype)]


def encode_blocks(
    keys: torch.Tensor,
    values: torch.Tensor,
    encoder: torch.Tensor | None,
    quantizers: Quantizers,
    block: int,
) -> list[torch.Tensor]:
    """Stored tensors of whole blocks ``[B, H, n·block, D]``, as ``encode.encode_blocks`` lists them: keys'
    (codes, scale, zero), the side code's (if ``encoder``), the values' (see :func:`block_encode_supports`)."""
    key_q, side_q, value_q = quantizers
    rank = 0 if encoder is None else encoder.shape[-1]
    outputs = _encoded_like(key_q, keys, keys.shape[-1], block)
    if rank:
        outputs += _encoded_like(side_q, keys, rank, block)
    outputs += _encoded_like(value_q, values, values.shape[-1], block)
    _launch_block_encode(keys, values, encoder, quantizers, outputs, block, None, None)
    return outputs


def commit_block(
    keys: torch.Tensor,
    values: torch.Tensor,
    encoder: torch.Tensor | None,
    quantizers: Quantizers,
    storage: list[torch.Tensor],
    target: torch.Tensor,
    commit: torch.Tensor,
) -> None:
    """Encode the block ``keys``/``values`` ``[B, H, block, D]`` into block ``target[0]`` of the fixed
    stores' ``storage`` (listed as :func:`encode_blocks` lists its outputs) where ``commit[0]``; a
    launch whose flag is off costs one load a program, no host branch."""
    _launch_block_encode(keys, values, encoder, quantizers, storage, keys.shape[2], target, commit)
