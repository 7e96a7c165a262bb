"""The hand-off from ``cache.update`` to the attention function.

transformers (5.17 to 5.24) never passes the cache to the attention function: it passes whatever
``update`` returned. So ``HeadQLayer.update`` returns :class:`HeadQStates`, a metadata-only
``torch.Tensor`` subclass (right shape, dtype and device; no storage) that carries a
:class:`AttentionInputs` pointing at the layer's packed codes:

- the ``headq`` attention function reads ``states.inputs`` and works on the packed codes directly;
- any other attention function (eager, sdpa, a user's own) touches it with a torch op, which
  materialises the dense *effective* keys ``k̂ + W ĉ`` (or dequantized values) first, so the
  model still runs, just without the memory saving during that call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch.utils._pytree import tree_map

LayerT = TypeVar("LayerT")


@dataclass
class AttentionInputs(Generic[LayerT]):
    """What one attention call needs from a cache layer (``AttentionInputs[HeadQLayer]``: the hand-off knows
    no layer class, so that the layers can import it and nothing here imports them back).

    Attributes:
        layer: the cache layer (packed stores, full-precision window, basis, A² accumulator).
        query_start: cache slot of the first query token of this call.
        fresh_start: first quantized slot that was flushed during this call. Tokens from here to
            the end of the quantized stores became quantized *during* this call; a query at slot
            ``p`` sees a token ``j`` of them quantized only if ``p >= block_end(j)``, as it would in
            a token-by-token decode. ``fresh_keys``/``fresh_values`` hold their exact states.
    """

    layer: LayerT
    query_start: int
    fresh_start: int
    fresh_keys: torch.Tensor | None
    fresh_values: torch.Tensor | None


class HeadQStates(torch.Tensor):
    """Keys or values of a HeadQ layer, as a lazy tensor (see the module docstring)."""

    inputs: AttentionInputs[Any]
    _materialize: Callable[[], torch.Tensor]

    @staticmethod
    def __new__(
        cls,
        dense_like: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
        inputs: AttentionInputs[Any],
        materialize: Callable[[], torch.Tensor],
    ) -> HeadQStates:
        states = torch.Tensor._make_wrapper_subclass(cls, dense_like, dtype=dtype, device=device)
        states.inputs = inputs
        states._materialize = materialize
        return states

    def __repr__(self) -> str:  # type: ignore[override]
        return f"HeadQStates(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__" or func in (torch.Tensor.size, torch.Tensor.dim):
            with torch._C.DisableTorchFunctionSubclass():  # metadata: answer from the wrapper
                return func(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*tree_map(_dense, args), **tree_map(_dense, kwargs))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        return func(*tree_map(_dense, args), **tree_map(_dense, kwargs or {}))


def _dense(x: Any) -> Any:
    """Materialise a :class:`HeadQStates` argument; leave anything else as it is."""
    return x._materialize() if isinstance(x, HeadQStates) else x
