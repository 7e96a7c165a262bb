"""Streaming query statistics and the query basis they define.

The second moment ``Σ_q = E[q qᵀ]`` of post-RoPE queries is accumulated per layer and KV head
(query heads sharing a KV head are pooled) in float64, one batch at a time, so memory is bounded
whatever the corpus size, and sums from several processes can simply be added (all-reduced).
"""

from __future__ import annotations

import torch

from .basis import LayerBasis, basis_from_second_moment


class QueryMoments:
    """Running ``Σ q qᵀ``, ``Σ q`` and counts for one layer, per KV head, in float64."""

    def __init__(self, kv_heads: int, head_dim: int, device: torch.device | str = "cpu") -> None:
        self.sum_outer = torch.zeros(kv_heads, head_dim, head_dim, dtype=torch.float64, device=device)
        self.sum = torch.zeros(kv_heads, head_dim, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, queries: torch.Tensor) -> None:
        """Add queries ``[batch, q_heads, tokens, head_dim]`` (q_heads a multiple of kv_heads)."""
        batch, q_heads, tokens, head_dim = queries.shape
        kv_heads = self.sum.shape[0]
        pooled = queries.detach().to(self.sum.device, torch.float64)
        pooled = pooled.reshape(batch, kv_heads, q_heads // kv_heads, tokens, head_dim)
        pooled = pooled.permute(1, 0, 2, 3, 4).reshape(kv_heads, -1, head_dim)
        self.sum_outer += pooled.transpose(1, 2) @ pooled
        self.sum += pooled.sum(1)
        self.count += pooled.shape[1]

    def to_layer_basis(self, rank: int) -> LayerBasis:
        if self.count == 0:
            raise ValueError("no queries were accumulated")
        second = (self.sum_outer / self.count).cpu()
        U, eigenvalues = basis_from_second_moment(second, rank)
        return LayerBasis(U=U, eigenvalues=eigenvalues, query_mean=(self.sum / self.count).float().cpu())
