"""One allocation holding several fixed tensors as views: a fixed-capacity layer's arena.

Why: ``torch.compile`` guards every tensor a compiled step reads from the Python objects it is
given, on every call, and CUDA graphs check every static input's address on every replay. A
fixed-capacity layer used to hand a decode step sixteen tensors (codes, scales and zeros of three
stores, the basis, ...), which made the host's per-step checks a visible share of a compiled
decode step. Packed into one ``uint8`` tensor, they cost one guard; the custom ops that read or
write them take the arena and a layout (plain ints) and cut the views inside.

A layout is a short text, ``offset:dtype:shape`` per tensor (``0:uint8:2x8x512x32;262144:float16:...``;
offsets in bytes, each a multiple of :data:`ALIGN_BYTES`, which kernels' vector loads want): a compiled
step passes it to the ops as one string, which costs one guard, where a tuple of ints costs one a
number. This module knows nothing of caches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

ALIGN_BYTES = 16
_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)  # what stores and bases hold


def padded_nbytes(t: torch.Tensor) -> int:
    """Bytes ``t`` takes in an arena (its own, rounded up to the alignment)."""
    return -(-t.numel() * t.element_size() // ALIGN_BYTES) * ALIGN_BYTES


def plan(tensors: Sequence[torch.Tensor]) -> tuple[str, int]:
    """The layout of ``tensors`` (their shapes and dtypes; any device, ``meta`` too) and its size in bytes."""
    segments = []
    offset = 0
    for t in tensors:
        if t.dtype not in _DTYPES:
            raise TypeError(f"an arena holds {_DTYPES}, not {t.dtype}")
        segments.append(f"{offset}:{str(t.dtype).removeprefix('torch.')}:{'x'.join(map(str, t.shape))}")
        offset += padded_nbytes(t)
    return ";".join(segments), offset


def carve(arena: torch.Tensor, layout: str) -> list[torch.Tensor]:
    """The contiguous views of ``arena`` that ``layout`` describes, in order."""
    views = []
    for segment in layout.split(";"):
        offset, dtype_name, dims = segment.split(":")
        dtype = getattr(torch, dtype_name)
        shape = tuple(int(n) for n in dims.split("x"))
        size = dtype.itemsize * math.prod(shape)
        start = int(offset)
        views.append(arena[start : start + size].view(dtype).view(shape))
    return views


def allocate(like: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, str, list[torch.Tensor]]:
    """A zeroed arena on ``device`` for tensors shaped as ``like``: (arena, layout, views)."""
    layout, size = plan(like)
    arena = torch.zeros(size, dtype=torch.uint8, device=device)
    return arena, layout, carve(arena, layout)


__all__ = ["ALIGN_BYTES", "allocate", "carve", "padded_nbytes", "plan"]
