"""The hand-written CUDA decode kernel (``cuda/decode.cu``): when it applies, how it is built, how it launches.

Why a second kernel beside the Triton one: decode over 2-bit codes must turn about one code an instruction
into tensor-core operands to keep up with HBM. Triton places the unpacked codes in its own register layout
and then moves them into the operands' layout: about 2000 instructions a warp per 64-token tile for that
alone (README, "Working on the GPU kernels"), against 1153 for this kernel's whole tile. The CUDA kernel reads
the packed bytes straight into operand registers (its header says how), folds the per-block scales into the
query, and merges its splits in the same launch. It covers the default HeadQ settings on head dim 128;
:func:`settings_covered` says exactly what, and everything else keeps the Triton kernel.

It is compiled on first use on the user's machine by ``torch.utils.cpp_extension`` (``nvcc`` and
``ninja`` needed; the build is cached by torch). Where that fails, a warning says why, once, and decode
falls back to the Triton kernel. ``HEADQ_CUDA_DECODE=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..quantize import QuantizedTokens
from .launch import sm_count

SOURCES = Path(__file__).parent / "cuda"
HEAD_DIM = 128
TILE = 64  # tokens a loop step of the kernel
ROWS = 8  # query heads a product holds: the most query heads a KV head may have here
SIDE_RANK = 16  # the side code the kernel reads: 16 directions of 4 bits
MAX_SINKS = 16  # exact sink keys the kernel reads (its first 16-token product)
# blocks_per_sm: thread blocks an SM holds at once, built into the kernel as its register cap (3: 168 registers a
# thread); wave_blocks_per_sm: the thread blocks an SM gets from the splits of one launch (at most blocks_per_sm: one
# wave); short_split_tiles: a split shorter than this (a few tiles a warp, where each split's fixed cost of query,
# qW and merge weighs most) is lengthened by filling one block an SM fewer; stages: the tiles a warp holds in shared
# memory (the one it computes and the rest in flight; 5.4 KB each, 4 warps a block); min_split_tokens: the fewest
# tokens a split gets (each split loads the query and writes partials that the merge reads).
LAUNCH = {"blocks_per_sm": 3, "wave_blocks_per_sm": 3, "short_split_tiles": 16, "stages": 2, "min_split_tokens": 256}
_MODEL_DTYPES = (torch.bfloat16, torch.float16)


def enabled() -> bool:
    return os.environ.get("HEADQ_CUDA_DECODE", "1") != "0"


def extension(timeline: bool = False) -> Any | None:
    """The compiled extension for :data:`LAUNCH` (built on first use, then loaded from torch's cache), or ``None``
    with a warning. ``timeline``: a build whose warps stamp their phases (``benchmarks/cuda_decode_timeline.py``)."""
    return _build(LAUNCH["blocks_per_sm"], LAUNCH["stages"], timeline)


def build_flags(blocks_per_sm: int, stages: int, timeline: bool = False) -> list[str]:
    """nvcc's flags for the kernel (``-lineinfo``: profilers map time to source lines; no cost at run time)."""
    flags = ["-O3", "-std=c++17", "-lineinfo", f"-DHEADQ_BLOCKS_PER_SM={blocks_per_sm}", f"-DHEADQ_STAGES={stages}"]
    return flags + (["-DHEADQ_TIMELINE=1"] if timeline else [])


@functools.cache
def _build(blocks_per_sm: int, stages: int, timeline: bool = False) -> Any | None:
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"headq_decode_cuda_{blocks_per_sm}_{stages}" + ("_timeline" if timeline else ""),
            sources=[str(SOURCES / "binding.cpp"), str(SOURCES / "decode.cu")],
            extra_include_paths=[str(SOURCES)],
            extra_cuda_cflags=build_flags(blocks_per_sm, stages, timeline),
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 (any build failure: fall back, say why)
        warnings.warn(
            f"transformers-headq: the CUDA decode kernel could not be built ({type(error).__name__}: {error}); "
            "decode uses the Triton kernel instead. It needs nvcc and ninja on the PATH (the CUDA toolkit "
            "matching torch's CUDA, and `pip install ninja`); HEADQ_CUDA_DECODE=0 silences this.",
            stacklevel=2,
        )
        return None


def _reads(
    head_dim: int, dtype: torch.dtype, groups: int, block: int, key_bits: int, value_bits: int, rank: int,
    side_bits: int, side_per_token: bool, meta_dtype: torch.dtype,
) -> bool:  # fmt: skip
    """The kernel's one rule, from the settings both callers know (each adds what only it can check)."""
    return (
        head_dim == HEAD_DIM
        and dtype in _MODEL_DTYPES
        and groups <= ROWS
        and block % TILE == 0
        and (key_bits, value_bits) == (2, 2)
        and (rank == 0 or (rank == SIDE_RANK and side_bits == 4 and not side_per_token))
        and meta_dtype == torch.float16
    )


def settings_covered(settings: Any) -> bool:
    """Whether the kernel reads stores of these :class:`DecodeSettings` (remembered on them, as ``cuda_covered``,
    for the decode steps): keys grouped by channel over a block, values by token over the head, a block-scaled
    side code."""
    key_q, side_q, value_q = settings.quantizers
    if key_q is None or value_q is None or (settings.rank and side_q is None):
        return False
    side_bits = side_q.bits if side_q is not None else 0
    side_per_token = side_q is not None and not (side_q.grouping == "channel" and side_q.group == settings.block)
    metas = {key_q.meta_dtype, value_q.meta_dtype} | ({side_q.meta_dtype} if side_q is not None else set())
    return (
        (key_q.grouping, key_q.group, value_q.grouping, value_q.group) == ("channel", settings.block, "token", HEAD_DIM)
        and len(metas) == 1
        and _reads(
            settings.head_dim, settings.dtype, settings.q_heads // settings.kv_heads, settings.block, key_q.bits,
            value_q.bits, settings.rank, side_bits, side_per_token, key_q.meta_dtype,
        )
    )  # fmt: skip


def covers(settings: Any, query: torch.Tensor, values: QuantizedTokens | torch.Tensor) -> bool:
    """Whether the CUDA kernel may take this step: enabled, on a GPU, :func:`settings_covered`, quantized values.
    (The tensors' strides and alignment are checked by the extension itself, in C++, at every launch.)"""
    return (
        query.device.type == "cuda"
        and enabled()
        and settings.cuda_covered  # settings_covered, remembered on the settings
        and query.dtype == settings.dtype
        and isinstance(values, QuantizedTokens)
    )


def splits(batch_heads: int, n_tokens: int, multiprocessors: int) -> tuple[int, int]:
    """``(splits, tokens per split)``: as many splits as fill one wave of ``wave_blocks_per_sm`` thread blocks an SM,
    each a whole number of tiles and at least ``min_split_tokens``; where that leaves splits shorter than
    ``short_split_tiles``, one block an SM fewer (on the H200: 12% faster at 32k tokens x 1 sequence and 8% at
    4k x 8, where 3 blocks an SM gave each warp about 3 tiles; 5-8% slower where warps already had 20 and more:
    ``benchmarks/records/cuda-decode-session10-h200.md``)."""
    tiles = max(1, -(-n_tokens // TILE))
    shortest = -(-LAUNCH["min_split_tokens"] // TILE)

    def per_split(wave: int) -> int:
        fit = max(1, wave * multiprocessors // batch_heads)
        return max(-(-tiles // fit), shortest)

    wave = LAUNCH["wave_blocks_per_sm"]
    tiles_per_split = per_split(wave)
    if tiles_per_split < LAUNCH["short_split_tiles"] and wave > 1:
        tiles_per_split = per_split(wave - 1)
    return -(-tiles // tiles_per_split), tiles_per_split * TILE


def fixed_covers(
    query: torch.Tensor, key_scale: torch.Tensor, key_bits: int, side_bits: int, side_per_token: bool, value_bits: int,
    rank: int, sink_keys: int, block: int,
) -> bool:  # fmt: skip
    """Whether the kernel reads a fixed-capacity cache of these settings (``kernels.fixed``'s custom op, whose
    stores group keys by channel over a block and values by token)."""
    return (
        query.device.type == "cuda"
        and enabled()
        and sink_keys <= MAX_SINKS
        and _reads(
            query.shape[3], query.dtype, query.shape[1] // key_scale.shape[1], block, key_bits, value_bits, rank,
            side_bits, side_per_token, key_scale.dtype,
        )
    )  # fmt: skip


def store_launch(
    query: torch.Tensor,
    decoder: torch.Tensor | None,
    keys: QuantizedTokens,
    side: QuantizedTokens | None,
    values: QuantizedTokens,
    sink_keys: torch.Tensor | None,
    block: int,
    lengths: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    timeline: bool = False,
) -> Any | None:
    """The kernel's launch over these stores, for steps with queries shaped as ``query``: the extension's
    ``StoreLaunch``, which checks the stores' layout and keeps their addresses once, so that a step
    (``launch(query, window_keys, window_values, valid, scaling, softcap)``, returning the output or ``None``
    where the step's tensors do not fit) passes only what changes. ``None`` (nothing to launch) where the kernel is
    not built or the stores' layout does not fit it (``binding.cpp`` says what it needs). A caller keeps it while
    the stores stay the same tensors (a growing cache: one a layer and block of tokens).

    ``lengths``: ``None``, or a fixed-capacity layer's device state, whose first two entries count its stored
    and window tokens (then the splits cover the stores' capacity, and a CUDA graph can replay the launch).
    ``counters``: a fixed-capacity layer's int32 counts of finished splits and claimed tiles, two a (sequence, KV
    head), zero between launches (the kernel leaves them so), with a fresh partials buffer a launch (a CUDA graph
    holds both);
    ``None``: the extension's buffers for the device and current stream. ``timeline``: from the build whose warps
    stamp their phases (``record_timeline``)."""
    ext = extension(timeline)
    if ext is None:
        return None
    batch_heads = query.shape[0] * keys.codes.shape[1]
    n_splits, per_split = splits(batch_heads, keys.codes.shape[2], sm_count(query.device))
    made = ext.StoreLaunch(
        query, decoder, keys.codes, keys.scale, keys.zero,
        side.codes if side is not None else None, side.scale if side is not None else None,
        side.zero if side is not None else None,
        values.codes, values.scale, values.zero, sink_keys, lengths, counters, counters is not None,
        query.shape[1] // keys.codes.shape[1], block, per_split, n_splits,
    )  # fmt: skip
    return made if made.fits else None


def launch(
    query: torch.Tensor,
    decoder: torch.Tensor | None,
    keys: QuantizedTokens,
    side: QuantizedTokens | None,
    values: QuantizedTokens,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    sink_keys: torch.Tensor | None,
    valid: torch.Tensor | None,
    block: int,
    scaling: float,
    softcap: float,
    lengths: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Attention output ``[B, 1, Hq, D]`` in the query's dtype, one launch on the query's device and current
    stream (:func:`store_launch` made for this one step); ``None`` (nothing launched) where the kernel is not built
    or the tensors' layout does not fit it. ``softcap`` 0: none."""
    made = store_launch(query, decoder, keys, side, values, sink_keys, block, lengths, counters)
    if made is None:
        return None
    return made(query, window_keys, window_values, valid, scaling, softcap)  # type: ignore[no-any-return]
