"""One loaded basis, many requests: a factory of fresh caches.

A cache holds one generation's state, so a server or a loop over prompts needs a new one per
request; loading and checking the basis every time would be wasteful. The factory loads and checks
it once, switches the model to the ``headq`` attention once, and then builds empty caches that
share the basis tensors (read-only) and nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .basis import QueryBasis
from .cache import HeadQCache
from .config import HeadQConfig


@dataclass(frozen=True)
class HeadQCacheFactory:
    """Call it to get an empty :class:`HeadQCache` for one request (``generate`` call).

    Example::

        make_cache = HeadQCacheFactory.from_pretrained("org/basis", model=model)
        for prompt in prompts:
            model.generate(**tok(prompt, return_tensors="pt"), past_key_values=make_cache())
    """

    basis: QueryBasis
    config: HeadQConfig
    model_config: Any
    max_cache_len: int | None = None

    def __call__(self, max_cache_len: int | None = None) -> HeadQCache:
        """An empty cache; ``max_cache_len`` (or the factory's) makes it fixed-capacity and compileable."""
        capacity = max_cache_len if max_cache_len is not None else self.max_cache_len
        return HeadQCache(self.basis, self.config, model_config=self.model_config, max_cache_len=capacity)

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
    ) -> HeadQCacheFactory:
        """Load a basis (folder, Hub repo id or :class:`QueryBasis`), check it against ``model`` and
        switch the model to the ``headq`` attention. ``overrides`` change the stored cache settings;
        ``max_cache_len`` gives every cache a fixed capacity (see :class:`HeadQCache`)."""
        from .attention import enable_headq_attention
        from .fingerprint import check_supported

        check_supported(model.config)
        if isinstance(path_or_repo_id, QueryBasis):
            basis = path_or_repo_id
        else:
            basis = QueryBasis.from_pretrained(
                path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
            )
        basis.check_model(model)
        config = HeadQConfig.from_dict(basis.quantizer).replace(**overrides)
        if config.rank is not None and config.rank != basis.rank:
            basis = basis.with_rank(config.rank)  # cut once, not per request
        if max_cache_len is not None:
            from .static import check_fixed_capacity_config, round_to_blocks

            check_fixed_capacity_config(config)
            round_to_blocks(max_cache_len, config.block_size)  # a clear error now, not at the first update
        enable_headq_attention(model)
        return cls(basis, config, model.config, max_cache_len)
