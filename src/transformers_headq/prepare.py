"""Loading a basis for a model: the checks and settings a cache needs before it is made.

Shared by :meth:`HeadQCache.from_pretrained` and :class:`~transformers_headq.factory.HeadQCacheFactory`;
it sits below both (it imports neither), so the cache never imports its factory.
"""

from __future__ import annotations

import os
from typing import Any

from .attention import enable_headq_attention
from .basis import QueryBasis
from .config import HeadQConfig
from .fingerprint import check_supported
from .parallel import tensor_parallel_kv_heads
from .static import check_fixed_capacity_config, round_to_blocks


def prepare_basis(
    path_or_repo_id: str | os.PathLike[str] | QueryBasis,
    model: Any,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    max_cache_len: int | None = None,
    **overrides: Any,
) -> tuple[QueryBasis, HeadQConfig]:
    """Load a basis (folder, Hub repo id or :class:`QueryBasis`), check it against ``model``, apply
    ``overrides`` to its stored cache settings (cutting the basis to the chosen rank once), keep the
    KV heads this process computes of a tensor-parallel model, check a fixed capacity's settings,
    and switch the model to the ``headq`` attention."""
    check_supported(model.config)
    if isinstance(path_or_repo_id, QueryBasis):
        basis = path_or_repo_id
    else:
        basis = QueryBasis.from_pretrained(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
    basis.check_model(model)
    heads = tensor_parallel_kv_heads(model)
    if heads is not None and basis.kv_heads != (heads.start, heads.stop):
        basis = basis.for_kv_heads(heads)
    config = HeadQConfig.from_dict(basis.quantizer).replace(**overrides)
    if config.rank is not None and config.rank != basis.rank:
        basis = basis.with_rank(config.rank)  # cut once, not per request
    if max_cache_len is not None:
        check_fixed_capacity_config(config)
        round_to_blocks(max_cache_len, config.block_size)  # a clear error now, not at the first update
    enable_headq_attention(model)
    return basis, config
