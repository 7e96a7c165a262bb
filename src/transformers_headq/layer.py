"""HeadQLayer: one attention layer's HeadQ storage, growing as tokens arrive.

Per layer: new tokens enter a full-precision window; every ``block_size`` tokens the window is
flushed into packed stores: key codes, the side code ``c = Uᵀ(k − k̂)`` of the key's quantization
error on the layer's query basis, and (full-KV mode) value codes. ``update`` returns
:class:`~transformers_headq.handoff.HeadQStates`, through which the ``headq`` attention function
reads the packed codes. The fixed-capacity, compileable variant is
:class:`~transformers_headq.static.StaticHeadQLayer`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .basis import LayerBasis
from .config import HeadQConfig
from .encode import LayerQuantizers, Quantizers, encode_blocks
from .errors import CacheInputError
from .handoff import AttentionInputs, HeadQStates
from .mixed_keys import MixedKeyQuantizer, MixedKeyStore
from .store import DenseStore, QuantizedStore, TokenBuffer, TokenStore
from .values import KeptValues

_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _store(quantizer: Any, n_channels: int) -> TokenStore:
    return DenseStore() if quantizer is None else QuantizedStore(quantizer, n_channels)


class HeadQLayer(CacheLayerMixin):
    """One attention layer's HeadQ storage."""

    is_compileable = False
    # Rolling back into already-quantized blocks moves their kept tokens back into the window as
    # the states attention saw (see `crop`), so outputs up to the crop point are reproduced.
    is_croppable = True

    def __init__(
        self,
        config: HeadQConfig,
        basis: LayerBasis | None,
        layer_idx: int,
        sliding_window: int | None = None,
        key_widths: torch.Tensor | None = None,
    ) -> None:
        """``key_widths`` ``[H, D]``: per-channel key bit widths (``config.mixed_key_bits``; the cache
        allocates them over all layers), or None for ``key_bits`` everywhere."""
        super().__init__()
        self.config = config
        self.key_widths = key_widths
        self.basis = basis
        self.layer_idx = layer_idx
        self.rank = 0 if basis is None else basis.rank
        # A sliding-window layer forgets whole quantized blocks that no future query can see.
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.evicted = 0

    # --------------------------------------------------------------- set-up
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._check_first_states(key_states, value_states)
        batch, heads, _, head_dim = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.shape = (batch, heads, head_dim)
        cfg = self.config
        self.encoder: torch.Tensor | None = None
        self.decoder: torch.Tensor | None = None
        if self.rank:
            assert self.basis is not None
            self.encoder = self.basis.U.to(self.device, torch.float32).contiguous()  # as a fixed layer holds it
            self.decoder = self.basis.decoder_or_u.to(self.device, torch.float32).contiguous()  # kernels read it
        self.key_store: TokenStore | MixedKeyStore = _store(cfg.key_quantizer(head_dim), head_dim)
        if self.key_widths is not None:
            self.key_store = MixedKeyStore(MixedKeyQuantizer(self.key_widths, cfg.block_size, cfg.meta_torch_dtype))
        self.side_store = _store(cfg.side_quantizer(self.rank), self.rank) if self.rank else None
        self.value_store = _store(cfg.value_quantizer(head_dim), head_dim)
        self.window_keys = key_states[:, :, :0]
        self.window_values = value_states[:, :, :0]
        self.attention_mass = (
            TokenBuffer(torch.zeros(batch, heads, 0, device=self.device)) if cfg.track_attention else None
        )
        self.kept = KeptValues(cfg, value_states) if cfg.value_keep else None
        # Exact keys of the first cfg.sink_keys slots, held once block 0 is quantized (None before and
        # after it is gone: evicted or cropped).
        self.sink_keys: torch.Tensor | None = None
        self.is_initialized = True

    def _check_first_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        where = f"HeadQCache layer {self.layer_idx}"
        if key_states.dim() != 4 or value_states.shape[:3] != key_states.shape[:3]:
            raise CacheInputError(
                f"{where}: expected keys and values of shape [batch, kv_heads, tokens, head_dim], got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if key_states.dtype not in _MODEL_DTYPES or value_states.dtype != key_states.dtype:
            raise CacheInputError(
                f"{where}: keys/values must share one of float32, float16, bfloat16; got "
                f"{key_states.dtype} and {value_states.dtype}. Load the model in one of those dtypes."
            )
        if self.key_widths is not None and tuple(self.key_widths.shape) != (key_states.shape[1], key_states.shape[3]):
            heads, head_dim = self.key_widths.shape
            raise CacheInputError(
                f"{where}: the key widths are for {heads} KV heads of dim {head_dim}, but the model gives "
                f"{key_states.shape[1]} heads of dim {key_states.shape[3]}: wrong basis for this model."
            )
        if self.basis is not None and self.rank:
            heads, head_dim = self.basis.U.shape[:2]
            if (key_states.shape[1], key_states.shape[3]) != (heads, head_dim):
                raise CacheInputError(
                    f"{where}: the basis is for {heads} KV heads of dim {head_dim}, but the model gives "
                    f"{key_states.shape[1]} heads of dim {key_states.shape[3]}: wrong basis for this model (on a "
                    "tensor-parallel rank, build the cache with HeadQCache.from_pretrained(basis, model=model), "
                    "which keeps this rank's heads)."
                )

    def _check_next_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, head_dim = self.shape
        got = (key_states.shape[0], key_states.shape[1], key_states.shape[3])
        if got != (batch, heads, head_dim) or value_states.shape[:2] != key_states.shape[:2]:
            raise CacheInputError(
                f"HeadQCache layer {self.layer_idx} holds batch {batch}, {heads} heads of dim {head_dim}, but got "
                f"keys {tuple(key_states.shape)}: use a fresh cache per request (cache.reset() or a new HeadQCache)."
            )
        if key_states.dtype != self.dtype or key_states.device != self.device or value_states.dtype != self.dtype:
            raise CacheInputError(
                f"HeadQCache layer {self.layer_idx} holds {self.dtype} on {self.device}, but got {key_states.dtype} "
                f"on {key_states.device}: use a fresh cache after moving or casting the model."
            )

    # -------------------------------------------------------------- update
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new tokens; return lazy key/value states for the attention function."""
        # An inference cache: stored states never carry autograd history.
        key_states, value_states = key_states.detach(), value_states.detach()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            self._check_next_states(key_states, value_states)
            self._evict(self._evictable())
        query_start = self.stored_length
        fresh_start = self.key_store.length
        keys = torch.cat([self.window_keys, key_states], dim=-2)
        values = torch.cat([self.window_values, value_states], dim=-2)
        if self.kept is not None:
            self.kept.grow_window(key_states.shape[-2])
        n_flush = (keys.shape[-2] // self.config.block_size) * self.config.block_size
        fresh_keys = fresh_values = None
        if n_flush:
            fresh_keys, fresh_values = keys[:, :, :n_flush], values[:, :, :n_flush]
            self._flush(fresh_keys, fresh_values)
            # Copy the remainder out, or the window view would keep the flushed block alive.
            keys, values = keys[:, :, n_flush:].clone(), values[:, :, n_flush:].clone()
        self.window_keys, self.window_values = keys, values
        if self.attention_mass is not None:
            self.attention_mass.append(key_states.new_zeros(key_states.shape[:3], dtype=torch.float32))
        inputs = AttentionInputs(self, query_start, fresh_start, fresh_keys, fresh_values)
        shape = (*key_states.shape[:2], self.stored_length, key_states.shape[3])
        return (
            HeadQStates(torch.Size(shape), self.dtype, self.device, inputs, self.effective_keys),
            HeadQStates(
                torch.Size(shape[:3] + value_states.shape[3:]), self.dtype, self.device, inputs, self.effective_values
            ),
        )

    def _quantizers(self) -> Quantizers:
        """The key, side-code and value quantizers (``None``: that stream is kept dense), as the kernels
        take them (layers with per-channel key widths are not theirs: see :meth:`_layer_quantizers`)."""
        head_dim, cfg = self.shape[2], self.config
        side = cfg.side_quantizer(self.rank) if self.rank else None
        return cfg.key_quantizer(head_dim), side, cfg.value_quantizer(head_dim)

    def _layer_quantizers(self) -> LayerQuantizers:
        """What the stores are encoded with: per-channel key widths where the layer has them."""
        key, side, value = self._quantizers()
        if isinstance(self.key_store, MixedKeyStore):
            return self.key_store.quantizer, side, value
        return key, side, value

    def _flush(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize whole blocks into the stores; the side code encodes the key error on ``U``."""
        if self.config.sink_keys and self.key_store.length == 0 and self.evicted == 0:  # block 0
            self.sink_keys = keys[:, :, : self.config.sink_keys].clone()
        encoded = encode_blocks(keys, values, self.encoder, self._layer_quantizers(), self.config.block_size)
        for store in (self.key_store, self.side_store, self.value_store):
            if store is not None:
                store.append_encoded(encoded[: store.n_parts])
                encoded = encoded[store.n_parts :]
        if self.kept is not None:
            self.kept.hold(self.value_store.length - values.shape[-2], values)

    # ------------------------------------------------------ sliding window
    def _evictable(self) -> int:
        """Tokens (whole quantized blocks) that no query from now on can see through the window.

        The next query is at absolute position ``get_seq_length()`` and sees keys after
        ``position - sliding_window``; blocks wholly before that are dropped. Computed the same
        way by :meth:`get_mask_sizes` before the forward and by :meth:`update` in it.
        """
        if self.sliding_window is None or not self.is_initialized:
            return 0
        first_visible = self.get_seq_length() - self.sliding_window + 1
        block = self.config.block_size
        return min(max(first_visible - self.evicted, 0) // block * block, self.quantized_length)

    def _evict(self, tokens: int) -> None:
        if not tokens:
            return
        for store in (self.key_store, self.side_store, self.value_store):
            if store is not None:
                store.drop_front(tokens)
        if self.kept is not None:
            self.kept.drop_front_blocks(tokens // self.config.block_size)
        if self.attention_mass is not None:
            self.attention_mass.drop_front(tokens)
        self.sink_keys = None  # whole blocks go: block 0, and the sinks in it, first
        self.evicted += tokens

    # ---------------------------------------------------------------- reads
    @property
    def quantized_length(self) -> int:
        """Quantized tokens held (after any sliding-window eviction)."""
        return self.key_store.length

    @property
    def stored_length(self) -> int:
        """Tokens held: quantized plus the full-precision window. Slots run from 0 to this."""
        return self.quantized_length + self.window_keys.shape[-2] if self.is_initialized else 0

    def read_keys(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dequantized keys ``k̂`` and side codes ``ĉ`` (float32) of quantized slots ``[start, end)``;
        sink slots read their exact keys and a zero side code."""
        side = None if self.side_store is None else self.side_store.read(start, end, torch.float32)
        keys = self.key_store.read(start, end, torch.float32)
        sinks = 0 if self.sink_keys is None else min(self.sink_keys.shape[-2], end) - start
        if sinks > 0:
            assert self.sink_keys is not None
            keys[:, :, :sinks] = self.sink_keys[:, :, start : start + sinks].float()
            if side is not None:
                side[:, :, :sinks] = 0
        return keys, side

    def read_values(self, start: int, end: int) -> torch.Tensor:
        """Values of quantized slots ``[start, end)`` (float32), kept tokens in full precision."""
        values = self.value_store.read(start, end, torch.float32)
        return values if self.kept is None else self.kept.apply(values, start, end)

    def _effective_quantized_keys(self, start: int, end: int) -> torch.Tensor:
        """Dense ``k̂ + W ĉ`` of quantized slots ``[start, end)``, in the model dtype."""
        key_hat, side = self.read_keys(start, end)
        if side is not None:
            assert self.decoder is not None
            key_hat = key_hat + torch.einsum("bhtr,hdr->bhtd", side, self.decoder)
        return key_hat.to(self.dtype)

    def effective_keys(self) -> torch.Tensor:
        """Dense ``k̂ + W ĉ`` for quantized slots, then the exact window: what attention sees."""
        if not self.quantized_length:  # nothing quantized yet (stores not allocated)
            return self.window_keys
        return torch.cat([self._effective_quantized_keys(0, self.quantized_length), self.window_keys], dim=-2)

    def effective_values(self) -> torch.Tensor:
        if self.kept is not None:
            self.kept.choose()  # another attention function read the cache: no A² mass this call
        if not self.quantized_length:
            return self.window_values
        values = self.read_values(0, self.quantized_length).to(self.dtype)
        return torch.cat([values, self.window_values], dim=-2)

    # ------------------------------------------------------ Cache protocol
    def get_seq_length(self) -> int:
        """Tokens seen so far, evicted ones included (what positions are counted from)."""
        return self.evicted + self.stored_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the next call, after the eviction its update will do."""
        evict = self._evictable()
        return self.stored_length - evict + query_length, self.evicted + evict

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        self.is_initialized = False
        self.evicted = 0
        for name in (
            "key_store",
            "side_store",
            "value_store",
            "window_keys",
            "window_values",
            "attention_mass",
            "kept",
            "sink_keys",
        ):
            self.__dict__.pop(name, None)

    def _map_batch(self, fn: Any) -> None:
        if not self.is_initialized:
            return
        for store in (self.key_store, self.side_store, self.value_store):
            if store is not None:
                store.map_batch(fn)
        if self.attention_mass is not None:
            self.attention_mass.map_batch(fn)
        if self.kept is not None:
            self.kept.map_batch(fn)
        self.window_keys, self.window_values = fn(self.window_keys), fn(self.window_values)
        if self.sink_keys is not None:
            self.sink_keys = fn(self.sink_keys)
        self.shape = (self.window_keys.shape[0], *self.shape[1:])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens (negative: how many; positive, legacy: the length to keep).

        Tokens of a partly removed quantized block are put back in the window as the dense
        states attention saw for them (``k̂ + W ĉ`` and ``v̂``), so the next query sees the same
        logits for them as before; they are quantized again when the window next fills.
        """
        length = self.get_seq_length()
        keep = tokens_to_remove if tokens_to_remove > 0 else length + tokens_to_remove
        if not self.is_initialized or keep >= length:
            return
        if keep < self.evicted:
            raise CacheInputError(
                f"HeadQCache layer {self.layer_idx} slides: tokens before {self.evicted} are gone, so it cannot "
                f"be cropped to {max(keep, 0)} tokens. Start a new cache instead."
            )
        keep = max(keep, 0) - self.evicted
        if self.kept is not None:
            self.kept.choose()
        if keep >= self.quantized_length:
            cut = keep - self.quantized_length
            window_keys, window_values = self.window_keys[:, :, :cut], self.window_values[:, :, :cut]
        else:
            aligned = (keep // self.config.block_size) * self.config.block_size
            block_end = aligned + self.config.block_size
            window_keys = self._effective_quantized_keys(aligned, block_end)[:, :, : keep - aligned]
            window_values = self.read_values(aligned, block_end)[:, :, : keep - aligned].to(self.dtype)
            for store in (self.key_store, self.side_store, self.value_store):
                if store is not None:
                    store.truncate(aligned)
            if aligned == 0:  # block 0 is back in the window (its exact sink keys with it)
                self.sink_keys = None
        # Copies, so that the new window does not keep the larger tensors it was cut from alive.
        self.window_keys, self.window_values = window_keys.clone(), window_values.clone()
        if self.attention_mass is not None:
            self.attention_mass.truncate(keep)
        if self.kept is not None:
            self.kept.truncate(self.quantized_length, self.window_keys.shape[-2])

    # --------------------------------------------------------------- memory
    def key_nbytes(self) -> int:
        """Bytes held for keys: codes, scales, zeros, side codes and the window (used parts)."""
        if not self.is_initialized:
            return 0
        stores = [self.key_store] + ([self.side_store] if self.side_store is not None else [])
        used = sum(buf.nbytes_used() for s in stores for buf in s.buffers())
        return used + sum(t.numel() * t.element_size() for t in self._dense_keys())

    def _dense_keys(self) -> list[torch.Tensor]:
        """The keys held in the model dtype: the window, and the sink keys when held."""
        return [self.window_keys] + ([self.sink_keys] if self.sink_keys is not None else [])

    def value_nbytes(self) -> int:
        """Bytes held for values, including the ``Σ p²`` accumulator when tracked."""
        if not self.is_initialized:
            return 0
        used = sum(buf.nbytes_used() for buf in self.value_store.buffers())
        if self.attention_mass is not None:
            used += self.attention_mass.nbytes_used()
        if self.kept is not None:
            used += sum(buf.nbytes_used() for buf in self.kept.buffers())
        return used + self.window_values.numel() * self.window_values.element_size()

    def nbytes_allocated(self) -> int:
        """Bytes of all tensors this layer holds, spare capacity of growing buffers included."""
        if not self.is_initialized:
            return 0
        stores = [s for s in (self.key_store, self.side_store, self.value_store) if s is not None]
        bufs = [b for s in stores for b in s.buffers()] + ([self.attention_mass] if self.attention_mass else [])
        bufs += self.kept.buffers() if self.kept is not None else []
        window = sum(t.numel() * t.element_size() for t in (*self._dense_keys(), self.window_values))
        return sum(b.nbytes_allocated() for b in bufs) + window
