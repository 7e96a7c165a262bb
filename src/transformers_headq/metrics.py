"""Model-visible distortion: score error, Fisher error, attention KL, and plain key MSE.

For queries ``q`` and keys ``k`` with errors ``δk``, the score error is ``δs = q·δk / √d``. Softmax
ignores a shift shared by all tokens, so what matters locally is the Fisher form
``I = Var_{t∼p}(δs_t)``, with ``KL(p ‖ p̂) ≈ I / 2``. All functions take ``[..., Q, D]`` queries and
``[..., T, D]`` keys (leading dims broadcast) and return a scalar mean over queries.
"""

from __future__ import annotations

import torch


def _scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return queries.double() @ keys.double().transpose(-1, -2) / keys.shape[-1] ** 0.5


def key_mse(keys: torch.Tensor, keys_hat: torch.Tensor) -> float:
    """Mean squared key error (storage space: what plain quantizers minimise)."""
    return float((keys_hat.double() - keys.double()).square().mean())


def score_error(queries: torch.Tensor, keys: torch.Tensor, keys_hat: torch.Tensor) -> float:
    """Mean squared logit error ``E (q·δk/√d)²``."""
    return float((_scores(queries, keys_hat) - _scores(queries, keys)).square().mean())


def fisher_error(queries: torch.Tensor, keys: torch.Tensor, keys_hat: torch.Tensor) -> float:
    """Mean over queries of ``Var_{t∼p}(δs_t)``, ``p`` the exact attention (shift-invariant)."""
    s = _scores(queries, keys)
    delta = _scores(queries, keys_hat) - s
    p = torch.softmax(s, dim=-1)
    mean = (p * delta).sum(-1, keepdim=True)
    return float((p * (delta - mean).square()).sum(-1).mean())


def attention_kl(queries: torch.Tensor, keys: torch.Tensor, keys_hat: torch.Tensor) -> float:
    """Mean over queries of ``KL(p ‖ p̂)`` between exact and distorted attention."""
    log_p = torch.log_softmax(_scores(queries, keys), dim=-1)
    log_p_hat = torch.log_softmax(_scores(queries, keys_hat), dim=-1)
    return float((log_p.exp() * (log_p - log_p_hat)).sum(-1).mean())
