"""Confidence intervals for perplexity and for the share of excess perplexity a method removes.

Next-token losses of nearby tokens are correlated (one hard passage raises many), so tokens are
not resampled one by one: each window's losses are cut into consecutive blocks of
``BLOCK_TOKENS`` and whole blocks are resampled (a block bootstrap). All rows of one evaluation
score the same tokens, so the share removed, ``(base − headq) / (base − full)``, is bootstrapped
*paired*: one draw of blocks is applied to the three rows together, which is what makes an
interval on a difference of a few percent meaningful.
"""

from __future__ import annotations

import math

import torch

BLOCK_TOKENS = 64
SAMPLES = 2000
LEVEL = 0.95
SEED = 0


def block_sums(token_nll: torch.Tensor, block_tokens: int = BLOCK_TOKENS) -> tuple[list[float], list[int]]:
    """Summed loss and token count of each block of ``block_tokens`` tokens, window by window.

    ``token_nll`` is ``[windows, tokens]``; a window's last block may be shorter.
    """
    sums: list[float] = []
    counts: list[int] = []
    for window in token_nll.double():
        for start in range(0, window.numel(), block_tokens):
            part = window[start : start + block_tokens]
            sums.append(float(part.sum()))
            counts.append(part.numel())
    return sums, counts


def draws(n_blocks: int, samples: int = SAMPLES, seed: int = SEED) -> torch.Tensor:
    """``[samples, n_blocks]`` block indices drawn with replacement (the same for every row)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_blocks, (samples, n_blocks), generator=generator)


def _resampled_mean_nll(sums: list[float], counts: list[int], index: torch.Tensor) -> torch.Tensor:
    s = torch.tensor(sums, dtype=torch.float64)[index].sum(-1)
    c = torch.tensor(counts, dtype=torch.float64)[index].sum(-1)
    return s / c


def _quantiles(values: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype))
    return float(low), float(high)


def perplexity_interval(sums: list[float], counts: list[int], index: torch.Tensor) -> tuple[float, float]:
    """``LEVEL`` interval of the perplexity ``exp(Σ loss / Σ tokens)`` under the block bootstrap."""
    return _quantiles(torch.exp(_resampled_mean_nll(sums, counts, index)))


def removed_share(full: float, method: float, base: float) -> float:
    """Share of ``base``'s excess perplexity over ``full`` that ``method`` removes."""
    return (base - method) / (base - full)


def removed_interval(
    full: tuple[list[float], list[int]],
    method: tuple[list[float], list[int]],
    base: tuple[list[float], list[int]],
    index: torch.Tensor,
) -> tuple[float, float]:
    """Paired ``LEVEL`` interval of :func:`removed_share`; draws where the base does not exceed full
    precision (no excess to remove) count as removing nothing."""
    ppl = [torch.exp(_resampled_mean_nll(s, c, index)) for s, c in (full, method, base)]
    excess = ppl[2] - ppl[0]
    share = torch.where(excess > 0, (ppl[2] - ppl[1]) / excess.clamp_min(math.ulp(1.0)), torch.zeros_like(excess))
    return _quantiles(share)
