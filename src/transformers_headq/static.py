"""A fixed-capacity HeadQ layer whose decode step ``torch.compile`` can capture whole.

:class:`StaticHeadQLayer` allocates its stores once, for ``max_cache_len`` tokens in whole
quantization blocks, plus a one-block full-precision window: the bytes allocated are the bytes the
bit accounting counts for that capacity, and no buffer ever moves (CUDA graphs need static
addresses). Its lengths live on the device:

- ``quantized``: tokens in the quantized stores (a multiple of ``block_size``),
- ``fill``: tokens in the window,
- ``overflow``: set if a decode step ran past the capacity (its token is never written over a
  stored one, its block is dropped; the next eager call raises :class:`CacheCapacityError`).

A decode step (one new token) writes the token into the window at ``fill``, quantizes the window
every step, and commits it as the next block only where the window is full: a predicated write,
so there is no host branch, no ``.item()`` and no allocation that depends on data. Attention then
reads the whole capacity and masks what is not yet written (:mod:`.static_attention`).

A prefill (several tokens) runs eagerly through the same stores and the reference attention,
exactly as the growing :class:`~transformers_headq.layer.HeadQLayer` does, so both store the same
codes. Settings that need host-side decisions per block (A² kept values, the attention-mass
diagnostic) are not available with a fixed capacity.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import HeadQConfig
from .encode import commit_block, quantizer_spec
from .errors import CacheInputError
from .handoff import AttentionInputs, HeadQStates, StaticDecodeStates
from .layer import HeadQLayer
from .store import CacheCapacityError, DenseStore, QuantizedStore, TokenStore, capacity_error


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def check_fixed_capacity_config(config: HeadQConfig) -> None:
    """Refuse settings a fixed-capacity cache cannot hold, saying what to do instead."""
    if config.value_keep or config.track_attention:
        raise CacheInputError(
            "max_cache_len (fixed capacity) does not support value_keep (A² kept values) or track_attention: "
            "set value_keep=0, or make the cache without max_cache_len"
        )


def round_to_blocks(max_cache_len: int, block_size: int) -> int:
    """Capacity in whole quantization blocks: ``max_cache_len`` rounded up."""
    if max_cache_len < 1:
        raise CacheInputError(f"max_cache_len must be a positive number of tokens, got {max_cache_len}")
    return -(-max_cache_len // block_size) * block_size


class StaticHeadQLayer(HeadQLayer):
    """One attention layer's HeadQ storage with a fixed capacity (see the module docstring)."""

    is_compileable = True

    def __init__(self, config: HeadQConfig, basis: Any, layer_idx: int, max_cache_len: int) -> None:
        check_fixed_capacity_config(config)
        # Sliding layers keep every token here (the mask hides old ones): eviction would move rows.
        super().__init__(config, basis, layer_idx, sliding_window=None)
        self.capacity = round_to_blocks(max_cache_len, config.block_size)
        self.max_cache_len = self.capacity  # what transformers' static layers call it

    # --------------------------------------------------------------- set-up
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if _compiling():
            raise CacheInputError("a HeadQ cache is filled by an eager prefill before compiled decode steps")
        super().lazy_initialization(key_states, value_states)
        batch, heads, head_dim = self.shape
        cfg, cap = self.config, self.capacity
        template = key_states[:, :, :0]
        self.key_store = self._fixed_store(cfg.key_quantizer(head_dim), head_dim, template)
        if self.rank:
            self.side_store = self._fixed_store(cfg.side_quantizer(self.rank), self.rank, template)
        self.value_store = self._fixed_store(cfg.value_quantizer(head_dim), head_dim, value_states[:, :, :0])
        self._window_k = key_states.new_zeros(batch, heads, cfg.block_size, head_dim)
        self._window_v = value_states.new_zeros(batch, heads, cfg.block_size, value_states.shape[-1])
        # One tensor, so that a kernel reads both counts through one pointer (see `quantized` and `fill`).
        self.lengths = torch.zeros(2, dtype=torch.long, device=self.device)
        self.overflow = torch.zeros(1, dtype=torch.bool, device=self.device)
        self._last_block = torch.full((1,), cap // cfg.block_size - 1, dtype=torch.long, device=self.device)
        self._mark_static()

    def _fixed_store(self, quantizer: Any, channels: int, template: torch.Tensor) -> TokenStore:
        if quantizer is None:
            return DenseStore(self.capacity, template.new_zeros(*template.shape[:2], 0, channels))
        return QuantizedStore(quantizer, channels, self.capacity, template)

    def _static_tensors(self) -> list[torch.Tensor]:
        stores = [s for s in (self.key_store, self.side_store, self.value_store) if s is not None]
        buffers = [b.storage for s in stores for b in s.buffers()]
        return [*buffers, self._window_k, self._window_v, self.lengths, self.overflow, self._last_block]

    def _mark_static(self) -> None:
        """Tell torch.compile these tensors keep their addresses (CUDA graphs then read them in place)."""
        basis = [t for t in (self.encoder, self.decoder) if t is not None]
        for tensor in [*self._static_tensors(), *basis]:
            torch._dynamo.mark_static_address(tensor)

    # Views made where they are used: a compiled step then sees (and mutates) the one static `lengths`.
    @property
    def quantized(self) -> torch.Tensor:
        """``[1]`` device count of quantized tokens."""
        return self.lengths[0:1]

    @property
    def fill(self) -> torch.Tensor:
        """``[1]`` device count of window tokens."""
        return self.lengths[1:2]

    # ---------------------------------------------------- host-side lengths
    # Eager code (prefill, crop, reporting) reads the device lengths; a compiled step never does.
    def _lengths(self) -> tuple[int, int]:
        if bool(self.overflow.item()):
            raise capacity_error(self.capacity, self.capacity + 1)
        quantized, fill = self.lengths.tolist()  # one read of both counts
        return quantized, fill

    def _sync_host(self) -> tuple[int, int]:
        quantized, fill = self._lengths()
        for store in (self.key_store, self.side_store, self.value_store):
            if store is not None:
                store.set_length(quantized)
        return quantized, fill

    @property
    def quantized_length(self) -> int:
        """Quantized tokens (eager only: reads the device count and brings the stores' host lengths up to it)."""
        return self._sync_host()[0] if self.is_initialized else 0

    @property
    def window_keys(self) -> torch.Tensor:  # type: ignore[override]
        return self._window_k[:, :, : self._lengths()[1]]

    @window_keys.setter
    def window_keys(self, value: torch.Tensor) -> None:
        """The parent's set-up assigns an empty window; the fixed window buffer is made separately."""

    @property
    def window_values(self) -> torch.Tensor:  # type: ignore[override]
        return self._window_v[:, :, : self._lengths()[1]]

    @window_values.setter
    def window_values(self, value: torch.Tensor) -> None:
        pass

    # -------------------------------------------------------------- update
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key_states, value_states = key_states.detach(), value_states.detach()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif not _compiling():
            self._check_next_states(key_states, value_states)
        if key_states.shape[-2] == 1 and self.is_initialized:
            states = self._decode_update(key_states, value_states)
            return states, states  # type: ignore[return-value]
        if _compiling():
            raise CacheInputError("HeadQ's fixed-capacity cache compiles decode steps only; run the prefill eagerly")
        return self._prefill_update(key_states, value_states)

    def _decode_update(self, key: torch.Tensor, value: torch.Tensor) -> StaticDecodeStates:
        """Append one token on the device; commit the window as a block where it is full."""
        block = self.config.block_size
        self.overflow.logical_or_(self.quantized + self.fill >= self.capacity)  # this token's position
        self._window_k.index_copy_(2, self.fill, key)
        self._window_v.index_copy_(2, self.fill, value)
        fill = self.fill + 1
        full = fill == block
        room = self.quantized < self.capacity
        commit = full & room
        target = torch.minimum(self.quantized // block, self._last_block)
        self._write_block(target, self._window_k, self._window_v, commit)
        self.quantized.add_(commit.long() * block)
        self.fill.copy_(torch.where(full, torch.zeros_like(fill), fill))
        return StaticDecodeStates(self)

    def _write_block(
        self, target: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, commit: torch.Tensor
    ) -> None:
        """The flush of :class:`HeadQLayer`, one block, at a device-side block index, where ``commit``
        (one opaque op: the same encoding as eager, a kernel that exits at once unless the flag is set)."""
        key_q, side_q, value_q = self._quantizers()
        stores = [s for s in (self.key_store, self.side_store, self.value_store) if s is not None]
        commit_block(
            keys, values, self.encoder, quantizer_spec(key_q), quantizer_spec(side_q), quantizer_spec(value_q),
            self.config.meta_torch_dtype, [b.storage for s in stores for b in s.buffers()], target, commit,
        )  # fmt: skip

    def _prefill_update(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager: the growing layer's update over the fixed stores and window buffer."""
        quantized, fill = self._sync_host()
        block = self.config.block_size
        keys = torch.cat([self._window_k[:, :, :fill], key_states], dim=-2)
        values = torch.cat([self._window_v[:, :, :fill], value_states], dim=-2)
        if quantized + keys.shape[-2] > self.capacity:
            raise capacity_error(self.capacity, quantized + keys.shape[-2])
        n_flush = (keys.shape[-2] // block) * block
        fresh_keys = fresh_values = None
        if n_flush:
            fresh_keys, fresh_values = keys[:, :, :n_flush], values[:, :, :n_flush]
            self._flush(fresh_keys, fresh_values)
        rest = keys.shape[-2] - n_flush
        self._window_k[:, :, :rest] = keys[:, :, n_flush:]
        self._window_v[:, :, :rest] = values[:, :, n_flush:]
        self.quantized.fill_(quantized + n_flush)
        self.fill.fill_(rest)
        inputs = AttentionInputs(self, quantized + fill, quantized, fresh_keys, fresh_values)
        shape = (*key_states.shape[:2], quantized + keys.shape[-2], key_states.shape[3])
        return (
            HeadQStates(torch.Size(shape), self.dtype, self.device, inputs, self.effective_keys),
            HeadQStates(
                torch.Size(shape[:3] + value_states.shape[3:]), self.dtype, self.device, inputs, self.effective_values
            ),
        )

    # ------------------------------------------------------ Cache protocol
    def get_seq_length(self) -> Any:  # type: ignore[override]
        """Tokens seen so far: a device tensor inside a compiled step, an int otherwise."""
        if not self.is_initialized:
            return 0
        if _compiling():
            return self.quantized + self.fill
        return sum(self._lengths())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Masks span the whole capacity (slot = position), as transformers' static layers do."""
        return self.capacity, 0

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        """Empty the cache in place: the buffers stay where they are, so a compiled step is reused."""
        if self.is_initialized:
            self.lengths.zero_()
            self.overflow.zero_()

    def _evictable(self) -> int:
        return 0

    def _map_batch(self, fn: Any) -> None:
        if not self.is_initialized:
            return
        quantized, _ = self._sync_host()
        for store in (self.key_store, self.side_store, self.value_store):
            if store is not None:
                store.map_batch(fn)
                store.set_length(quantized)
        self._window_k, self._window_v = fn(self._window_k).contiguous(), fn(self._window_v).contiguous()
        self.shape = (self._window_k.shape[0], *self.shape[1:])
        self._mark_static()  # new tensors (a compiled step records them anew)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens; a partly removed block goes back to the window as attention saw it."""
        if not self.is_initialized:
            return
        quantized, fill = self._sync_host()
        length = quantized + fill
        keep = tokens_to_remove if tokens_to_remove > 0 else length + tokens_to_remove
        if keep >= length:
            return
        keep = max(keep, 0)
        if keep >= quantized:
            self.fill.fill_(keep - quantized)
            return
        aligned = (keep // self.config.block_size) * self.config.block_size
        block_end = aligned + self.config.block_size
        window_k = self._effective_quantized_keys(aligned, block_end)[:, :, : keep - aligned]
        window_v = self.read_values(aligned, block_end)[:, :, : keep - aligned].to(self.dtype)
        self._window_k[:, :, : keep - aligned] = window_k
        self._window_v[:, :, : keep - aligned] = window_v
        self.quantized.fill_(aligned)
        self.fill.fill_(keep - aligned)
        self._sync_host()

    # --------------------------------------------------------------- memory
    def nbytes_allocated(self) -> int:
        """Bytes of every tensor this layer allocated (the whole capacity and the window buffer)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in self._static_tensors())

    def key_nbytes(self) -> int:
        if self.is_initialized:
            self._sync_host()
        return super().key_nbytes()

    def value_nbytes(self) -> int:
        if self.is_initialized:
            self._sync_host()
        return super().value_nbytes()


__all__ = ["CacheCapacityError", "StaticHeadQLayer", "check_fixed_capacity_config", "round_to_blocks"]
