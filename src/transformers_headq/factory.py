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
from .prepare import prepare_basis


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
        basis, config = prepare_basis(
            path_or_repo_id, model, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            token=token, max_cache_len=max_cache_len, **overrides,
        )  # fmt: skip
        return cls(basis, config, model.config, max_cache_len)
