"""Which key-error measure predicts the attention damage? Per layer and KV head, on real text.

For every layer and KV head, the queries of the last ``queries`` tokens of each window attend to
the keys of the whole-block prefix before them (no mask needed). Keys are quantized with the
given settings (plain KIVI-style 2-bit by default), and the measured attention KL is set against
key MSE, score error and Fisher error ``Var_p(δs)``. The paper's claim, reproduced here: the
Fisher and score errors rank heads by KL far better than key MSE does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .calibrate import observe_attention
from .config import HeadQConfig
from .metrics import attention_kl, fisher_error, key_mse, score_error

MEASURES = ("key_mse", "score_error", "fisher_error")


@dataclass
class HeadDiagnosis:
    layer: int
    head: int
    key_mse: float
    score_error: float
    fisher_error: float
    kl: float


def _fake_quantize(keys: torch.Tensor, config: HeadQConfig) -> torch.Tensor:
    quantizer = config.key_quantizer(keys.shape[-1])
    if quantizer is None:
        raise ValueError("diagnose needs quantized keys (key_bits)")
    return quantizer.dequantize(quantizer.quantize(keys), keys.shape[-1], torch.float32)


@torch.no_grad()
def diagnose(
    model: Any, windows: torch.Tensor, config: HeadQConfig | None = None, queries: int = 64
) -> list[HeadDiagnosis]:
    """Per-(layer, KV head) KL, key MSE, score and Fisher errors, averaged over ``windows`` [n, T]."""
    config = config or HeadQConfig(rank=0)
    block = config.block_size if config.key_grouping == "channel" else 1
    prefix = ((windows.shape[1] - queries) // block) * block
    if prefix <= 0:
        raise ValueError(f"windows of {windows.shape[1]} tokens are too short for {queries} queries and a key block")
    sums: dict[tuple[int, int], list[float]] = {}

    def observe(layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        batch, q_heads, _, dim = query.shape
        kv_heads = key.shape[1]
        q = query[:, :, -queries:].float().reshape(batch, kv_heads, -1, dim)
        k = key[:, :, :prefix].float()
        k_hat = _fake_quantize(k, config)
        for head in range(kv_heads):
            args = (q[:, head], k[:, head], k_hat[:, head])
            row = [key_mse(k[:, head], k_hat[:, head]), score_error(*args), fisher_error(*args), attention_kl(*args)]
            acc = sums.setdefault((layer, head), [0.0] * 4)
            sums[(layer, head)] = [a + b for a, b in zip(acc, row, strict=True)]

    device = next(model.parameters()).device
    with observe_attention(model, observe):
        for ids in windows.split(1):
            model(input_ids=ids.to(device), use_cache=False)
    n = windows.shape[0]
    return [HeadDiagnosis(layer, head, *(v / n for v in values)) for (layer, head), values in sorted(sums.items())]


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(values), dtype=torch.float64)
        for value in t.unique():
            tied = t == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def correlations(rows: list[HeadDiagnosis]) -> dict[str, float]:
    """Spearman correlation of each measure with the attention KL across heads."""
    kl = [r.kl for r in rows]
    return {m: spearman([getattr(r, m) for r in rows], kl) for m in MEASURES}


def plot_diagnosis(rows: list[HeadDiagnosis], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rho = correlations(rows)
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4 * len(MEASURES), 3.6), sharey=True)
    for ax, measure in zip(axes, MEASURES, strict=True):
        ax.scatter([getattr(r, measure) for r in rows], [r.kl for r in rows], s=10, c=[r.layer for r in rows])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(measure.replace("_", " "))
        ax.set_title(f"Spearman ρ = {rho[measure]:.2f}")
    axes[0].set_ylabel("attention KL (per head)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
