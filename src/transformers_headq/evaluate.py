"""Perplexity harness: HeadQ against full precision, plain quantizers, quanto and the controls.

Every row is a decode-exact perplexity: what a token-by-token decode through that cache gives.
HeadQ and plain rows run one forward per window through :class:`HeadQCache` (its prefill is
decode-exact by construction, and ``tests/test_evaluate.py`` checks it against a true decode
loop); quanto's cache is only defined by its decode loop, so its rows run token by token.

Bits per element count everything stored (see :func:`bits_per_element`), with full-precision
elements and all scales at 16 bits, as a deployment in fp16/bf16 stores them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .attention import enable_headq_attention
from .basis import QueryBasis
from .cache import HeadQCache
from .config import HeadQConfig, bits_per_element
from .fingerprint import model_fingerprint
from .loading import cache_kwargs

Mode = Literal["k-only", "full-kv"]
Profile = Literal["core", "quick", "full"]
DEPLOY_DTYPE = torch.float16
QUANTO_GROUP = 64
QUANTO_RESIDUAL = 128


@dataclass(frozen=True)
class Method:
    """One evaluated setting. ``basis_kind`` names the basis (``"query"`` or a control) or ``None``."""

    mode: Mode
    method: str
    grouping: str = "-"
    config: HeadQConfig | None = None
    basis_kind: str | None = None
    quanto_bits: int | None = None

    @property
    def rank(self) -> int:
        return (self.config.rank or 0) if self.config is not None else 0

    @property
    def setting(self) -> str:
        """The storage settings in short (``K2/channel V2 keep2 r8 s4/block``)."""
        if self.config is None:
            return "-" if self.quanto_bits is None else f"nbits={self.quanto_bits} group={QUANTO_GROUP}"
        c = self.config
        parts = [f"K{c.key_bits}/{c.key_grouping}"]
        if c.block_size != 64:
            parts.append(f"b{c.block_size}")
        if c.value_bits is not None:
            parts.append(f"V{c.value_bits}")
        if c.value_keep:
            parts.append(f"keep{c.value_keep}" + ("" if c.value_policy == "a2" else f"/{c.value_policy}"))
        if self.rank:
            parts.append(f"r{self.rank} s{c.side_bits}/{c.side_scale}")
        return " ".join(parts)

    @property
    def base_setting(self) -> str:
        """The setting of the plain quantizer this row adds to (no side code, no kept values)."""
        if self.config is None:
            return self.setting
        return dataclasses.replace(self, config=self.config.replace(rank=0, value_keep=0)).setting


@dataclass
class Row:
    """One line of the results table (and of the ``--json`` list)."""

    model: str
    corpus: str
    mode: str
    method: str
    setting: str
    base_setting: str
    grouping: str
    rank: int
    side_bits: int | None
    key_bits: float
    value_bits: float
    ppl: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- settings
def _headq(rank: int, side_bits: int, block: int = 64, **changes: Any) -> HeadQConfig:
    return HeadQConfig(rank=rank, side_bits=side_bits, side_scale="block", block_size=block, **changes)


def standard_methods(profile: Profile = "quick") -> list[Method]:
    """The rows ``headq eval`` runs: the quick profile is the README's main job, ``full`` adds every
    rank, side-code width and block, ``core`` is the handful a transfer check needs.

    Plain and HeadQ rows span 2.4-3.5 bits per key element (blocks of 64 and 128 tokens) so that a
    Pareto front can be drawn; the controls share one HeadQ setting.
    """
    if profile == "core":  # the rows a transfer or regression check needs, in under a minute
        return [
            Method("k-only", "full-precision"),
            Method("k-only", "plain", "channel", HeadQConfig(key_bits=2, rank=0)),
            Method("k-only", "headq", "channel", _headq(8, 4), "query"),
            Method("k-only", "headq", "channel", _headq(16, 3), "query"),
            Method("k-only", "random", "channel", _headq(16, 3), "random"),
        ]
    methods = [Method("k-only", "full-precision")]
    blocks = (64, 128) if profile == "quick" else (32, 64, 128)
    for block in blocks:
        for bits in (2, 3) if profile == "quick" else (2, 3, 4):
            methods.append(Method("k-only", "plain", "channel", HeadQConfig(key_bits=bits, rank=0, block_size=block)))
    for bits in (2, 3):
        methods.append(Method("k-only", "plain", "token", HeadQConfig(key_bits=bits, key_grouping="token", rank=0)))
    # (key bits, block, rank, side bits): 2-bit keys with side codes of growing rank, and a small side
    # code on 3-bit keys for the top of the 2.5-3.5 bit range, where plain 3-bit keys are strong.
    if profile == "quick":
        grid = [(2, 64, 4, 4), (2, 64, 8, 4), (2, 64, 12, 3), (2, 64, 16, 3), (2, 128, 4, 2), (2, 128, 12, 2)]
        grid += [(2, 128, 16, 3), (2, 128, 24, 3), (3, 128, 4, 2)]
    else:
        grid = [(2, b, r, s) for b in blocks for r in (2, 4, 8, 12, 16, 24, 32) for s in (2, 3, 4)]
        grid += [(3, b, r, s) for b in blocks for r in (2, 4, 8) for s in (2, 3)]
    for key_bits, block, rank, side_bits in grid:
        config = _headq(rank, side_bits, block, key_bits=key_bits)
        methods.append(Method("k-only", "headq", "channel", config, "query"))
    methods.append(Method("k-only", "headq", "token", _headq(8, 4, key_grouping="token"), "query"))
    for kind in ("random", "key-pca", "wrong-sign"):
        methods.append(Method("k-only", kind, "channel", _headq(16, 3), kind))

    for key_bits, value_bits in ((2, 2), (3, 2), (2, 3)):
        methods.append(
            Method("full-kv", "plain", "channel", HeadQConfig(key_bits=key_bits, value_bits=value_bits, rank=0))
        )
    for rank, keep in ((4, 2), (8, 0), (8, 2)):
        methods.append(Method("full-kv", "headq", "channel", _headq(rank, 4, value_bits=2, value_keep=keep), "query"))
    control = _headq(8, 4, value_bits=2, value_keep=2, value_policy="position")
    methods.append(Method("full-kv", "position-keep", "channel", control, "query"))
    methods.append(Method("full-kv", "quanto", "token", quanto_bits=2))
    if profile == "full":
        methods.append(Method("full-kv", "quanto", "token", quanto_bits=4))
    return methods


def control_basis(basis: QueryBasis, kind: str, key_pca: QueryBasis | None, seed: int = 0) -> QueryBasis:
    """The basis a row uses: the calibrated one or one of the paper's controls."""
    if kind == "query":
        return basis
    if kind == "random":
        return QueryBasis.random(basis, seed)
    if kind == "wrong-sign":
        return basis.flipped()
    if kind == "key-pca":
        if key_pca is None:
            raise ValueError("the key-pca control needs a key-PCA basis (headq calibrate writes one)")
        return key_pca
    raise ValueError(f"unknown basis kind {kind!r}")


# -------------------------------------------------------------- perplexity
def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )


@torch.no_grad()
def forward_nll(model: Any, ids: torch.Tensor, cache: Any | None) -> torch.Tensor:
    """Summed next-token NLL of ``ids`` [B, T] in one forward through ``cache`` (None: no cache)."""
    out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=cache is not None)
    return _nll(out.logits, ids)


@torch.no_grad()
def decode_nll(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Summed next-token NLL of ``ids`` [B, T] fed one token at a time through ``cache``."""
    kwargs = cache_kwargs(model, cache)
    logits = [model(input_ids=ids[:, t : t + 1], **kwargs, use_cache=True).logits for t in range(ids.shape[1])]
    return _nll(torch.cat(logits, dim=1), ids)


def perplexity(
    model: Any,
    windows: torch.Tensor,
    make_cache: Callable[[], Any] | None,
    decode: bool = False,
    batch_size: int = 1,
) -> float:
    """Perplexity over ``windows`` [n, T]; each window starts from a fresh cache."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        cache = None if make_cache is None else make_cache()
        nll = decode_nll(model, ids, cache) if decode else forward_nll(model, ids, cache)
        total += float(nll)
        count += ids.shape[0] * (ids.shape[1] - 1)
    return math.exp(total / count)


# ---------------------------------------------------------------- quanto
def quanto_cache(model: Any, bits: int) -> Any:
    """transformers' quanto ``QuantizedCache`` for ``model`` with the settings this project compares against."""
    from transformers import QuantizedCache

    head_dim = model_fingerprint(model.config)["head_dim"]
    return QuantizedCache(
        backend="quanto",
        config=model.config,
        nbits=bits,
        q_group_size=min(QUANTO_GROUP, head_dim),
        residual_length=QUANTO_RESIDUAL,
    )


def quanto_bits_per_element(cache: Any) -> tuple[float, float]:
    """Measured (key, value) bits per element of a filled quanto cache, fp16 metadata assumed.

    Quanto groups ``q_group_size`` channels of one token; each group stores a scale and a shift in
    the activation dtype. The residual full-precision tokens count at 16 bits.
    """
    layer = cache.layers[0]
    out = []
    for quantized, residual in ((layer._quantized_keys, layer.keys), (layer._quantized_values, layer.values)):
        elements = quantized.numel() + (residual.numel() if residual.dim() == 4 else 0)
        groups = quantized.numel() // layer.q_group_size
        stored = quantized.numel() * layer.nbits + groups * 2 * 16 + (elements - quantized.numel()) * 16
        out.append(stored / elements)
    return out[0], out[1]


# ------------------------------------------------------------------ rows
@dataclass
class EvalSetup:
    model: Any
    model_name: str
    corpus_name: str
    windows: torch.Tensor
    basis: QueryBasis
    key_pca: QueryBasis | None = None
    batch_size: int = 1


def evaluate_method(setup: EvalSetup, method: Method) -> Row:
    """Perplexity and stored bits of one method on the setup's windows."""
    model, windows = setup.model, setup.windows
    fp = model_fingerprint(model.config)
    head_dim, seq_len = fp["head_dim"], windows.shape[1]
    side_bits = None
    if method.config is None:
        model.set_attn_implementation("sdpa")
    if method.quanto_bits is not None:
        # The decode loop is slow: batch all windows together.
        cache = quanto_cache(model, method.quanto_bits)
        ppl = perplexity(model, windows, lambda: cache, decode=True, batch_size=windows.shape[0])
        key_bits, value_bits = quanto_bits_per_element(cache)
    elif method.config is None:
        ppl = perplexity(model, windows, None, batch_size=setup.batch_size)
        key_bits = value_bits = 16.0
    else:
        config = method.config
        basis = None
        if method.basis_kind is not None:
            basis = control_basis(setup.basis, method.basis_kind, setup.key_pca).with_rank(method.rank)
            side_bits = config.side_bits

        # Plain rows too need the headq attention: it is what makes a one-forward prefill decode-exact.
        enable_headq_attention(model)

        def make_cache() -> HeadQCache:
            return HeadQCache(basis, config, num_layers=fp["num_hidden_layers"])

        ppl = perplexity(model, windows, make_cache, batch_size=setup.batch_size)
        cost = bits_per_element(config, head_dim, method.rank, seq_len, DEPLOY_DTYPE)
        key_bits, value_bits = cost.key, cost.value
    return Row(
        model=setup.model_name,
        corpus=setup.corpus_name,
        mode=method.mode,
        method=method.method,
        setting=method.setting,
        base_setting=method.base_setting,
        grouping=method.grouping,
        rank=method.rank,
        side_bits=side_bits,
        key_bits=round(key_bits, 4),
        value_bits=round(value_bits, 4),
        ppl=ppl,
        tokens=int(windows.shape[0] * (seq_len - 1)),
    )


def run_evaluation(setup: EvalSetup, methods: Iterable[Method], progress: bool = True) -> list[Row]:
    methods = list(methods)
    if progress:
        from tqdm.auto import tqdm

        return [evaluate_method(setup, m) for m in tqdm(methods, desc="evaluating", unit="row")]
    return [evaluate_method(setup, m) for m in methods]


# --------------------------------------------------------------- summary
def excess_removed(fp: Row, headq: Row, base: Row) -> float:
    """Share of the base quantizer's excess perplexity that ``headq`` removes."""
    return (base.ppl - headq.ppl) / (base.ppl - fp.ppl)


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| mode | method | setting | key bits/elem | value bits/elem | PPL |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.mode} | {r.method} | {r.setting} | {r.key_bits:.3f} | {r.value_bits:.3f} | {r.ppl:.3f} |")
    return "\n".join(lines)


def pareto_front(rows: list[Row], bits: Callable[[Row], float]) -> list[Row]:
    """Rows no other row beats on both bits and perplexity, sorted by bits."""
    ordered = sorted(rows, key=lambda r: (bits(r), r.ppl))
    front: list[Row] = []
    for r in ordered:
        if not front or r.ppl < front[-1].ppl:
            front.append(r)
    return front


def plot_results(rows: list[Row], path: str) -> None:
    """PPL against bits per element, one Pareto curve per method; K-only and full-KV panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[Mode, Callable[[Row], float], str]] = [
        ("k-only", lambda r: r.key_bits, "bits per key element"),
        ("full-kv", lambda r: (r.key_bits + r.value_bits) / 2, "bits per K/V element"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    full = [r for r in rows if r.method == "full-precision"]
    for ax, (mode, bits, xlabel) in zip(axes, panels, strict=True):
        chosen = [r for r in rows if r.mode == mode]
        for method in dict.fromkeys(r.method for r in chosen):
            front = pareto_front([r for r in chosen if r.method == method], bits)
            ax.plot([bits(r) for r in front], [r.ppl for r in front], marker="o", label=method)
        for r in full:
            ax.axhline(r.ppl, color="grey", linestyle=":", label="full precision")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def headline(rows: list[Row]) -> list[str]:
    """Share of the excess perplexity each K-only HeadQ row removes from its plain base quantizer."""
    fp = next((r for r in rows if r.method == "full-precision"), None)
    plain = {(r.mode, r.setting): r for r in rows if r.method == "plain"}
    lines = []
    for r in rows:
        base = plain.get((r.mode, r.base_setting))
        if fp is None or r.method != "headq" or r.mode != "k-only" or base is None or base.ppl <= fp.ppl:
            continue
        share = excess_removed(fp, r, base)
        change = f"{base.ppl:.2f} -> {r.ppl:.2f}"
        lines.append(f"{r.setting}: removes {100 * share:.1f}% of the excess PPL of plain {base.setting} ({change})")
    return lines


def fair_budget_losses(
    rows: list[Row], low: float = 2.5, high: float = 3.5
) -> list[tuple[float, float, Row, Row | None]]:
    """Key-bit budgets in ``[low, high]`` where HeadQ's best K-only row at or below the budget does
    not beat the best plain row at or below it, as ``(from, to, best plain, best headq or None)``."""
    k_only = [r for r in rows if r.mode == "k-only" and r.method in ("plain", "headq")]
    budgets = sorted({low} | {r.key_bits for r in k_only if low <= r.key_bits < high})
    losses: list[tuple[float, float, Row, Row | None]] = []
    for start, end in zip(budgets, [*budgets[1:], high], strict=True):
        plain = _best(k_only, "plain", start)
        headq = _best(k_only, "headq", start)
        if plain is None or (headq is not None and headq.ppl < plain.ppl):
            continue
        if losses and losses[-1][1] == start and losses[-1][2] is plain and losses[-1][3] is headq:
            losses[-1] = (losses[-1][0], end, plain, headq)
        else:
            losses.append((start, end, plain, headq))
    return losses


def _best(rows: list[Row], method: str, budget: float) -> Row | None:
    return min((r for r in rows if r.method == method and r.key_bits <= budget), key=lambda r: r.ppl, default=None)


def fair_budget_summary(rows: list[Row], low: float = 2.5, high: float = 3.5) -> str:
    """One line: where, in ``[low, high]`` key bits, HeadQ's front is below the plain front or not."""
    losses = fair_budget_losses(rows, low, high)
    if not losses:
        return f"Fair budget: at every key budget in [{low}, {high}] bits HeadQ's best row beats the best plain row."
    parts = []
    for start, end, plain, headq in losses:
        theirs = "no HeadQ row" if headq is None else f"HeadQ {headq.setting} {headq.ppl:.2f}"
        parts.append(f"[{start:.3f}, {end:.3f}) bits: plain {plain.setting} {plain.ppl:.2f} vs {theirs}")
    return f"Fair budget: HeadQ's best row beats the best plain row in [{low}, {high}] bits except " + "; ".join(parts)
