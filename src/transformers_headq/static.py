"""A fixed-capacity HeadQ layer whose decode step ``torch.compile`` can capture whole.

:class:`StaticHeadQLayer` allocates its stores once, for ``max_cache_len`` tokens in whole
quantization blocks, in one arena with the basis (:mod:`.arena`: a compiled step then checks three
tensors a layer, not sixteen), plus a one-block full-precision window: the bytes allocated are the
bytes the bit accounting counts for that capacity, and no buffer ever moves (CUDA graphs need
static addresses). Its lengths live on the device:

- ``quantized``: tokens in the quantized stores (a multiple of ``block_size``),
- ``fill``: tokens in the window,
- ``overflow``: set if a decode step ran past the capacity (its token is never written over a
  stored one, its block is dropped; the next eager call raises :class:`CacheCapacityError`).

A decode step (one new token) writes the token into the window at ``fill``, quantizes the window
every step, and commits it as the next block only where the window is full: a predicated write,
so there is no host branch, no ``.item()`` and no allocation that depends on data (block 0's first
``sink_keys`` keys go to their exact rows the same way). Attention then reads the whole capacity and
masks what is not yet written (:mod:`.static_attention`).

A prefill (several tokens) runs eagerly through the same stores and the reference attention,
exactly as the growing :class:`~transformers_headq.layer.HeadQLayer` does, so both store the same
codes. Settings that need host-side decisions per block (A² kept values, the attention-mass
diagnostic) are not available with a fixed capacity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from . import arena
from .config import HeadQConfig
from .encode import commit_block, quantizer_spec
from .errors import CacheInputError
from .handoff import AttentionInputs, HeadQStates
from .kernels import STATE_COUNTS, decode_supports, state_entries
from .layer import HeadQLayer
from .store import CacheCapacityError, DenseStore, QuantizedStore, TokenBuffer, TokenStore, capacity_error


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def check_fixed_capacity_config(config: HeadQConfig) -> None:
    """Refuse settings a fixed-capacity cache cannot hold, saying what to do instead."""
    if config.value_keep or config.track_attention:
        raise CacheInputError(
            "max_cache_len (fixed capacity) does not support value_keep (A² kept values) or track_attention: "
            "set them to 0, or make the cache without max_cache_len"
        )


def round_to_blocks(max_cache_len: int, block_size: int) -> int:
    """Capacity in whole quantization blocks: ``max_cache_len`` rounded up."""
    if max_cache_len < 1:
        raise CacheInputError(f"max_cache_len must be a positive number of tokens, got {max_cache_len}")
    return -(-max_cache_len // block_size) * block_size


@dataclass(frozen=True)
class FixedPlan:
    """Everything a compiled decode step reads of a fixed-capacity layer besides its three tensors, as
    plain values: ``torch.compile`` guards each on every call, so there are few (see :mod:`.arena`)."""

    block_size: int
    capacity: int
    key_dim: int
    value_dim: int
    rank: int
    sink_keys: int
    key_spec: tuple[int, ...]
    side_spec: tuple[int, ...]
    value_spec: tuple[int, ...]
    meta_dtype: torch.dtype
    layout: str  # the arena: the stores' tensors, then the encoder and decoder if rank
    fused: bool  # whether the fused decode kernel covers these settings (where kernels run)


class StaticHeadQLayer(HeadQLayer):
    """One attention layer's HeadQ storage with a fixed capacity (see the module docstring).

    Three tensors hold it: ``arena`` (the stores over the whole capacity and the basis, one
    allocation), ``window`` (``[B, H, block + S, D_k + D_v]``: a block of exact keys and values, then
    the ``S = sink_keys`` exact sink keys in the key half of their rows, the value half unused) and
    ``state`` (``[3 + n]`` int64: quantized tokens, window tokens, overflow flag, then the CUDA decode kernel's
    count of finished splits for each (sequence, KV head), as int32 pairs, zero between launches: allocated
    here so that a CUDA graph replays them in place). Sink rows are read only
    once block 0 is quantized (its device count says so), so they need no flag of their own."""

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
        cfg = self.config
        # The stores are laid out on the meta device first, then moved into one arena.
        key_template, value_template = key_states[:, :, :0].to("meta"), value_states[:, :, :0].to("meta")
        self.key_store = self._fixed_store(cfg.key_quantizer(head_dim), head_dim, key_template)
        if self.rank:
            self.side_store = self._fixed_store(cfg.side_quantizer(self.rank), self.rank, key_template)
        self.value_store = self._fixed_store(cfg.value_quantizer(head_dim), value_states.shape[-1], value_template)
        layout = self._place_in_arena()
        rows = cfg.block_size + cfg.sink_keys
        self.window = key_states.new_zeros(batch, heads, rows, head_dim + value_states.shape[-1])
        self.state = torch.zeros(state_entries(batch * heads), dtype=torch.long, device=self.device)
        key_q, side_q, value_q = self._quantizers()
        self.plan = FixedPlan(
            cfg.block_size, self.capacity, head_dim, value_states.shape[-1], self.rank, cfg.sink_keys,
            tuple(quantizer_spec(key_q)),
            tuple(quantizer_spec(side_q)), tuple(quantizer_spec(value_q)), cfg.meta_torch_dtype, layout,
            decode_supports((key_q, side_q, value_q), self.rank, cfg.block_size, head_dim),
        )  # fmt: skip
        self._mark_static()

    def _fixed_store(self, quantizer: Any, channels: int, template: torch.Tensor) -> TokenStore:
        if quantizer is None:
            return DenseStore(self.capacity, template.new_zeros(*template.shape[:2], 0, channels))
        return QuantizedStore(quantizer, channels, self.capacity, template)

    def _buffers(self) -> list[TokenBuffer]:
        stores = [s for s in (self.key_store, self.side_store, self.value_store) if s is not None]
        return [b for s in stores for b in s.buffers()]

    def _place_in_arena(self) -> str:
        """Move the stores' buffers and the basis into one new arena (their rows are copied over); its layout."""
        buffers = self._buffers()
        basis = [t for t in (self.encoder, self.decoder) if t is not None]
        self.arena, layout, views = arena.allocate([*(b.storage for b in buffers), *basis], self.device)
        for buffer, view in zip(buffers, views, strict=False):
            buffer.adopt(view)
        for tensor, view in zip(basis, views[len(buffers) :], strict=True):
            view.copy_(tensor)
        if basis:
            self.encoder, self.decoder = views[len(buffers) :]
        return layout

    def _static_tensors(self) -> list[torch.Tensor]:
        return [self.arena, self.window, self.state]

    def _mark_static(self) -> None:
        """Tell torch.compile these tensors keep their addresses (CUDA graphs then read them in place)."""
        for tensor in self._static_tensors():
            torch._dynamo.mark_static_address(tensor)

    # Views made where they are used: a compiled step then sees (and mutates) the one static `state`.
    @property
    def quantized(self) -> torch.Tensor:
        """``[1]`` device count of quantized tokens."""
        return self.state[0:1]

    @property
    def fill(self) -> torch.Tensor:
        """``[1]`` device count of window tokens."""
        return self.state[1:2]

    @property
    def lengths(self) -> torch.Tensor:
        """``[2]`` device counts of quantized and window tokens (one pointer for a kernel)."""
        return self.state[0:2]

    @property
    def _window_k(self) -> torch.Tensor:
        return self.window[:, :, : self.plan.block_size, : self.plan.key_dim]

    @property
    def _window_v(self) -> torch.Tensor:
        return self.window[:, :, : self.plan.block_size, self.plan.key_dim :]

    @property
    def _sink_rows(self) -> torch.Tensor:
        """``[B, H, S, D]`` exact keys of the first ``S`` slots (valid once block 0 is quantized)."""
        return self.window[:, :, self.plan.block_size :, : self.plan.key_dim]

    @property
    def sink_keys(self) -> torch.Tensor | None:  # type: ignore[override]
        """The exact sink keys while block 0 is quantized, else ``None`` (eager only: reads the device count)."""
        if not (self.is_initialized and self.config.sink_keys and self._lengths()[0]):
            return None
        return self._sink_rows

    @sink_keys.setter
    def sink_keys(self, value: torch.Tensor | None) -> None:
        """Block 0's flush copies its first keys into the sink rows; ``None`` (block 0 gone) needs no write:
        the quantized count says whether the rows are read."""
        if value is not None:
            self._sink_rows.copy_(value)

    # ---------------------------------------------------- host-side lengths
    # Eager code (prefill, crop, reporting) reads the device lengths; a compiled step never does.
    def _lengths(self) -> tuple[int, int]:
        quantized, fill, overflow = self.state[:STATE_COUNTS].tolist()  # one read of the counts and the flag
        if overflow:
            raise capacity_error(self.capacity, self.capacity + 1)
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
        plan = self.plan
        block, quantized, fill = plan.block_size, self.quantized, self.fill
        overflow = (quantized + fill >= plan.capacity).long()  # this token's position is past the capacity
        self.state[2:3].bitwise_or_(overflow)
        self.window.index_copy_(2, fill, torch.cat([key, value], dim=-1))
        filled = fill + 1
        full = filled == block
        commit = full & (quantized < plan.capacity)
        target = (quantized // block).clamp(max=plan.capacity // block - 1)
        if plan.sink_keys:  # block 0's first keys, exact, where it is being committed
            sinks = self._sink_rows
            first_block = commit & (quantized == 0)
            sinks.copy_(torch.where(first_block, self._window_k[:, :, : plan.sink_keys], sinks))
        commit_block(
            self._window_k, self._window_v, self.arena, plan.layout,
            list(plan.key_spec), list(plan.side_spec), list(plan.value_spec), plan.rank, plan.meta_dtype,
            target, commit,
        )  # fmt: skip
        quantized.add_(commit.long() * block)
        fill.copy_(torch.where(full, torch.zeros_like(filled), filled))
        return StaticDecodeStates(self)

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
            self.state.zero_()

    def _evictable(self) -> int:
        return 0

    def _map_batch(self, fn: Any) -> None:
        if not self.is_initialized:
            return
        quantized, _ = self._sync_host()
        for store in (self.key_store, self.side_store, self.value_store):
            if store is not None:
                store.map_batch(fn)  # a fixed buffer leaves the arena here, and goes back into a new one below
                store.set_length(quantized)
        self.plan = dataclasses.replace(self.plan, layout=self._place_in_arena())
        self.window = fn(self.window).contiguous()
        self.shape = (self.window.shape[0], *self.shape[1:])
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
        """Bytes this layer allocated for tokens: its arena (the whole capacity) less the basis, the window
        buffer and the counters."""
        if not self.is_initialized:
            return 0
        basis = sum(arena.padded_nbytes(t) for t in (self.encoder, self.decoder) if t is not None)
        return sum(t.numel() * t.element_size() for t in self._static_tensors()) - basis

    def key_nbytes(self) -> int:
        if self.is_initialized:
            self._sync_host()
        return super().key_nbytes()

    def value_nbytes(self) -> int:
        if self.is_initialized:
            self._sync_host()
        return super().value_nbytes()


@dataclass
class StaticDecodeStates:
    """What a fixed-capacity layer's decode step hands to the ``headq`` attention (keys and values).

    Not a tensor: a compiled decode step traces it as a plain object, and the attention reads the
    layer's fixed buffers and device-side lengths from it. Only the ``headq`` attention accepts it
    (``HeadQCache.from_pretrained`` switches the model to it).
    """

    layer: StaticHeadQLayer

    @property
    def shape(self) -> torch.Size:
        """``[B, H_kv, slots, D]`` like key states (slots: the capacity and the window), for model code
        that reads the shape of what the cache returned before calling the attention."""
        batch, heads, head_dim = self.layer.shape
        return torch.Size((batch, heads, self.layer.capacity + self.layer.config.block_size, head_dim))


__all__ = [
    "CacheCapacityError",
    "FixedPlan",
    "StaticDecodeStates",
    "StaticHeadQLayer",
    "check_fixed_capacity_config",
    "round_to_blocks",
]
