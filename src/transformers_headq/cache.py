"""HeadQCache: a transformers ``Cache`` of :class:`~transformers_headq.layer.HeadQLayer` layers (growing)
or, with ``max_cache_len``, of :class:`~transformers_headq.static.StaticHeadQLayer` layers (fixed
capacity, compileable). Building one from a basis and a model (loading and checking the basis) is
:mod:`.prepare`'s job; the factory module makes many caches from one basis.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers.cache_utils import Cache

from .basis import QueryBasis
from .config import BitsPerElement, HeadQConfig
from .errors import CacheInputError
from .fingerprint import sliding_windows
from .layer import HeadQLayer
from .mixed_keys import allocate_key_widths, stored_code_bits
from .prepare import prepare_basis
from .static import StaticHeadQLayer


class HeadQCache(Cache):
    """A transformers ``Cache`` with 2-bit keys and a query-basis side code (HeadQ).

    Build it with :meth:`from_pretrained` (loads and checks a basis, switches the model to the
    ``headq`` attention) or directly from a :class:`QueryBasis` and a :class:`HeadQConfig`.
    Settings can be overridden by keyword (``HeadQCache(basis, key_bits=3, rank=8)``).
    """

    def __init__(
        self,
        basis: QueryBasis | None = None,
        config: HeadQConfig | None = None,
        *,
        num_layers: int | None = None,
        model_config: Any = None,
        max_cache_len: int | None = None,
        **overrides: Any,
    ) -> None:
        """``model_config`` (the model's config) tells which layers slide and over how many tokens;
        without it every layer keeps all its tokens (still correct: the mask hides old ones).

        ``max_cache_len``: a fixed capacity in tokens (rounded up to whole blocks), allocated at the
        first update and never exceeded; such a cache is compileable (``torch.compile`` captures its
        decode step, and ``generate`` compiles decoding on GPUs). ``None``: stores grow as needed."""
        windows: list[int | None] | None = None
        if model_config is not None:
            windows = sliding_windows(model_config)
            if num_layers is not None and num_layers != len(windows):
                raise CacheInputError(f"num_layers={num_layers} but the model config has {len(windows)} layers")
            num_layers = len(windows)
        if config is None:
            config = HeadQConfig.from_dict(basis.quantizer) if basis is not None else HeadQConfig()
        config = config.replace(**overrides)
        if basis is not None:
            if config.rank is not None and config.rank != basis.rank:
                basis = basis.with_rank(config.rank)
            if num_layers is not None and num_layers != basis.num_layers:
                raise CacheInputError(f"num_layers={num_layers} but the basis has {basis.num_layers} layers")
            num_layers = basis.num_layers
        elif config.rank:
            raise CacheInputError(f"rank={config.rank} needs a query basis; pass one, or rank=0")
        if num_layers is None:
            raise CacheInputError("pass a basis, or num_layers for a cache without side codes")
        self.config = config
        self.basis = basis
        self.key_widths = _key_widths(config, basis, max_cache_len)
        windows = windows or [None] * num_layers
        layers: list[Any]
        if max_cache_len is None:
            layers = [
                HeadQLayer(
                    config,
                    None if basis is None else basis.layers[i],
                    i,
                    windows[i],
                    None if self.key_widths is None else self.key_widths[i],
                )  # fmt: skip
                for i in range(num_layers)
            ]
        else:
            layers = [
                StaticHeadQLayer(config, None if basis is None else basis.layers[i], i, max_cache_len)
                for i in range(num_layers)
            ]
        super().__init__(layers=layers)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike[str] | QueryBasis,
        model: Any,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        max_cache_len: int | None = None,
        **overrides: Any,
    ) -> HeadQCache:
        """Load a basis (local folder or Hub repo id), check it against ``model``, switch the
        model to the ``headq`` attention, and return an empty cache for one generation.

        ``revision``, ``cache_dir``, ``local_files_only`` and ``token`` go to the Hub download;
        ``max_cache_len`` makes a fixed-capacity, compileable cache (prompt + new tokens, rounded up to
        whole blocks); other keywords override the cache settings stored with the basis (``rank=8``, ...)."""
        basis, config = prepare_basis(
            path_or_repo_id, model, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            token=token, max_cache_len=max_cache_len, **overrides,
        )  # fmt: skip
        return cls(basis, config, model_config=model.config, max_cache_len=max_cache_len)

    # ---------------------------------------------------------- reporting
    def key_code_bits(self) -> float | None:
        """Mean stored bits per key code with per-channel widths (byte padding included), else None: what
        :func:`~transformers_headq.config.bits_per_element` takes as ``key_code_bits``."""
        return None if self.key_widths is None else stored_code_bits(self.key_widths)

    def memory_bytes(self) -> int:
        """Bytes the cache's tensors hold for keys and values (used parts, everything counted)."""
        return sum(layer.key_nbytes() + layer.value_nbytes() for layer in self.layers)  # type: ignore[union-attr]

    def allocated_bytes(self) -> int:
        """Bytes of the cache's tensors including spare capacity of growing buffers."""
        return sum(layer.nbytes_allocated() for layer in self.layers)  # type: ignore[union-attr]

    def measured_bits_per_element(self) -> BitsPerElement:
        """Bits per cached key and value element, measured from the bytes actually held."""
        key = value = elements = 0
        for layer in self.layers:
            assert isinstance(layer, HeadQLayer)
            if layer.is_initialized:
                batch, heads, head_dim = layer.shape
                elements += batch * heads * layer.stored_length * head_dim
                key += layer.key_nbytes()
                value += layer.value_nbytes()
        if not elements:
            raise ValueError("the cache is empty")
        return BitsPerElement(key=8 * key / elements, value=8 * value / elements)

    def attention_mass(self, layer_idx: int) -> torch.Tensor:
        """Accumulated ``Σ p²`` per cached token, ``[batch, kv_heads, tokens]`` (needs track_attention)."""
        layer = self.layers[layer_idx]
        assert isinstance(layer, HeadQLayer)
        if layer.attention_mass is None:
            raise ValueError("attention mass is tracked only with HeadQConfig(track_attention=True)")
        return layer.attention_mass.data


def _key_widths(config: HeadQConfig, basis: QueryBasis | None, max_cache_len: int | None) -> list[torch.Tensor] | None:
    """Per-layer key widths for ``config.mixed_key_bits`` from the basis' channel weights, or None."""
    if config.mixed_key_bits is None:
        return None
    if max_cache_len is not None:
        raise CacheInputError(
            "mixed_key_bits is not supported by the fixed-capacity cache (max_cache_len) yet: use a growing cache "
            "(max_cache_len=None) or uniform key_bits"
        )
    weights = None if basis is None else [layer.key_channel_weight for layer in basis.layers]
    if weights is None or any(w is None for w in weights):
        raise CacheInputError(
            "mixed_key_bits needs a basis with key channel weights (key_channel_weight); this basis has none. "
            "Calibrate one with `headq calibrate`, which writes them."
        )
    return allocate_key_widths([w for w in weights if w is not None], config.mixed_key_bits)
