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
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .attention import enable_headq_attention
from .basis import OBLIQUE, QueryBasis
from .cache import HeadQCache
from .config import HeadQConfig, bits_per_element
from .fingerprint import model_fingerprint, sliding_windows
from .intervals import block_sums, draws, perplexity_interval, removed_interval, removed_share
from .loading import cache_kwargs

Mode = Literal["k-only", "full-kv"]
Profile = Literal["core", "quick", "full", "long"]
DEPLOY_DTYPE = torch.float16
QUANTO_GROUP = 64
QUANTO_RESIDUAL = 128
POSITION_BUCKETS = 8
# Key bits of the fair-budget comparison (plain rows in this range must not be on the Pareto front), and the
# side-code width of the rows that fill each plain row's budget.
FRONT_BITS = (2.5, 3.5)
BUDGET_SIDE_BITS = 3
# Exact first keys of every quantized row unless told otherwise: the cache's default (HeadQConfig.sink_keys).
DEFAULT_SINK_KEYS = HeadQConfig().sink_keys
# The full-KV budget (bits per key and per value element) and block of full_kv_budget_method.
FULL_KV_BITS = 3.1
FULL_KV_BLOCK = 128
MIXED_BLOCK = 128  # per-channel key widths: blocks of 128 halve the scale bytes every channel pays


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
        parts = [f"K{c.key_bits}/{c.key_grouping}" if c.mixed_key_bits is None else f"K{c.mixed_key_bits:g}/mixed"]
        if c.block_size != 64:
            parts.append(f"b{c.block_size}")
        if c.sink_keys:
            parts.append(f"sink{c.sink_keys}")
        if c.value_bits is not None:
            parts.append(f"V{c.value_bits}")
        if c.value_keep:
            parts.append(f"keep{c.value_keep}" + ("" if c.value_policy == "a2" else f"/{c.value_policy}"))
        if self.rank:
            parts.append(f"r{self.rank} s{c.side_bits}/{c.side_scale}")
            if self.basis_kind == OBLIQUE:
                parts.append(OBLIQUE)
        return " ".join(parts)

    @property
    def base_setting(self) -> str:
        """The setting of the plain quantizer this row adds to (no side code, no kept values)."""
        if self.config is None:
            return self.setting
        plain = self.config.replace(rank=0, value_keep=0, mixed_key_bits=None)
        return dataclasses.replace(self, config=plain).setting


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
    ppl_low: float = math.nan
    ppl_high: float = math.nan
    # For HeadQ-like rows: the share of their plain base's excess perplexity removed, with its interval.
    removed: float | None = None
    removed_low: float | None = None
    removed_high: float | None = None
    # Why the row has no result (a method this model or machine cannot run), or None.
    skipped: str | None = None
    # Summed loss and tokens per bootstrap block (see intervals.py): what the intervals are made from.
    block_nll: list[float] = field(default_factory=list, repr=False)
    block_tokens: list[int] = field(default_factory=list, repr=False)
    # Mean loss of the tokens in each of POSITION_BUCKETS equal spans of the window (first to last).
    position_nll: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def ok(self) -> bool:
        return self.skipped is None


# ---------------------------------------------------------------- settings
def _headq(rank: int, side_bits: int, block: int = 64, **changes: Any) -> HeadQConfig:
    return HeadQConfig(rank=rank, side_bits=side_bits, side_scale="block", block_size=block, **changes)


def with_sink_keys(method: Method, sink_keys: int) -> Method:
    """``method`` holding its first ``sink_keys`` keys exact (0: none), where it quantizes keys (otherwise as
    it is)."""
    config = method.config
    if config is None or config.key_bits is None:
        return method
    return dataclasses.replace(method, config=config.replace(sink_keys=sink_keys))


def _rank(head_dim: int, sixteenths: float) -> int:
    """A side-code rank of ``sixteenths / 16`` of the head: the same bits per key element at any head dim."""
    return max(1, round(head_dim * sixteenths / 16))


def _largest(upper: int, fits: Callable[[int], bool]) -> int:
    """The largest ``n`` in ``1 .. upper`` with ``fits(n)``, or 0 (costs grow with ``n``, padding aside)."""
    return next((n for n in range(upper, 0, -1) if fits(n)), 0)


def budget_rank(config: HeadQConfig, budget: float, head_dim: int, seq_len: int) -> int:
    """The largest side-code rank whose keys, stored with ``config``, cost at most ``budget`` bits per
    element over windows of ``seq_len`` tokens (everything counted, byte padding included); 0 if none."""
    return _largest(
        head_dim, lambda rank: bits_per_element(config, head_dim, rank, seq_len, DEPLOY_DTYPE).key <= budget + 1e-9
    )


def front_bits(seq_len: int, sink_keys: int = DEFAULT_SINK_KEYS) -> tuple[float, float]:
    """The key bits of the fair-budget comparison, ``FRONT_BITS`` moved up by what exact sink keys cost a key
    element over windows of ``seq_len`` tokens (every quantized row pays it), so that sinks move no plain row
    out of the comparison (plain 3-bit keys with a sink cost 3.5 + 16 / seq_len bits). The cost is the budget's
    own accounting (:func:`bits_per_element`) with and without the sinks, so the two cannot disagree."""
    plain = HeadQConfig(rank=0, sink_keys=0)  # blocks of 64, the grid's smallest in quick and long
    cost = [bits_per_element(plain.replace(sink_keys=n), 1, 0, seq_len, DEPLOY_DTYPE).key for n in (0, sink_keys)]
    sinks = cost[1] - cost[0]
    return FRONT_BITS[0] + sinks, FRONT_BITS[1] + sinks


def budget_methods(
    methods: list[Method], head_dim: int, seq_len: int, sink_keys: int = DEFAULT_SINK_KEYS
) -> list[Method]:
    """One oblique row per plain K-only budget in :func:`front_bits`: 2-bit keys on blocks of 64 with a side code
    of 3-bit entries of the largest rank that budget pays for, so that at every plain row's budget HeadQ has
    a row of no more bits (the fair-budget comparison), whatever the head dimension."""
    budgets = sorted(
        {
            bits_per_element(m.config, head_dim, 0, seq_len, DEPLOY_DTYPE).key
            for m in methods
            if m.mode == "k-only" and m.method == "plain" and m.config is not None
        }
    )
    rows = []
    low, high = front_bits(seq_len, sink_keys)
    for budget in budgets:
        if not low - 1e-9 <= budget <= high + 1e-9:
            continue
        rank = budget_rank(_headq(1, BUDGET_SIDE_BITS, sink_keys=sink_keys), budget, head_dim, seq_len)
        row = Method("k-only", "headq", "channel", _headq(rank, BUDGET_SIDE_BITS, sink_keys=sink_keys), OBLIQUE)
        if rank and row not in rows:
            rows.append(row)
    return rows


def mixed_key_methods(
    methods: list[Method], head_dim: int, seq_len: int, sink_keys: int = DEFAULT_SINK_KEYS
) -> list[Method]:
    """K-only rows with query-aware per-channel key widths (:mod:`.mixed_keys`) on blocks of
    ``MIXED_BLOCK`` tokens: one of 2 bits a code on average (beside plain 2-bit keys, its base), and one per
    plain K-only budget in :func:`front_bits`, of the largest mean width (in sixteenths of a bit) whose
    nominal cost fits that budget. The table reports the bits the allocation stores (never more than the
    nominal ones but for byte padding of 1-bit rows, which is counted)."""

    def config(mean: float) -> HeadQConfig:
        return HeadQConfig(key_bits=int(mean), block_size=MIXED_BLOCK, rank=0, mixed_key_bits=mean, sink_keys=sink_keys)

    def cost(mean: float) -> float:
        return bits_per_element(config(mean), head_dim, 0, seq_len, DEPLOY_DTYPE).key

    low, high = front_bits(seq_len, sink_keys)
    budgets = sorted(
        {
            bits_per_element(m.config, head_dim, 0, seq_len, DEPLOY_DTYPE).key
            for m in methods
            if m.mode == "k-only" and m.method == "plain" and m.config is not None
        }
    )
    means = [2.0]
    for budget in budgets:
        if low - 1e-9 <= budget <= high + 1e-9:
            fits = [n / 16 for n in range(16, 65) if cost(n / 16) <= budget + 1e-9]
            if fits and fits[-1] not in means:
                means.append(fits[-1])
    return [Method("k-only", "headq", "channel", config(mean), "query") for mean in means]


def full_kv_budget_method(
    head_dim: int, seq_len: int, budget: float = FULL_KV_BITS, sink_keys: int = DEFAULT_SINK_KEYS
) -> Method:
    """Full-KV HeadQ at no more than ``budget`` bits per key and per value element: 2-bit keys and values on
    blocks of ``FULL_KV_BLOCK`` tokens, the oblique side code (3-bit entries) of the largest rank the key
    budget pays for, and the A² policy keeping as many values per block as the value budget pays for.

    Blocks of 128 rather than 64 halve the keys' scale bytes and pay a kept value per 128 tokens at half the
    cost: on the default model this measured 57.57 against 58.50 for blocks of 64 at the same budget."""
    base = _headq(1, BUDGET_SIDE_BITS, FULL_KV_BLOCK, value_bits=2, sink_keys=sink_keys)
    rank = budget_rank(base, budget, head_dim, seq_len)

    def values_fit(keep: int) -> bool:
        config = base.replace(rank=rank, value_keep=keep)
        return bits_per_element(config, head_dim, rank, seq_len, DEPLOY_DTYPE).value <= budget + 1e-9

    keep = _largest(FULL_KV_BLOCK, values_fit)
    return Method("full-kv", "headq", "channel", base.replace(rank=rank, value_keep=keep), OBLIQUE)


def standard_methods(
    profile: Profile = "quick", head_dim: int = 64, seq_len: int = 512, sink_keys: int = DEFAULT_SINK_KEYS
) -> list[Method]:
    """The rows ``headq eval`` runs: ``quick`` is the README's main job, ``full`` adds every rank,
    side-code width and block, ``core`` is the handful a transfer check needs, ``long`` is the set
    the long-context evaluation needs (fronts of plain and HeadQ rows, the full-KV budget row, no slow
    decode loop, no row that only the 512-token grid needs).

    Side-code ranks are fractions of ``head_dim`` (a rank-``r`` code of ``s`` bits costs ``r·s/head_dim``
    bits per key element), so every model gets rows spanning the same 2.4-3.5 key bits; for head
    dim 64 they are ranks 4 to 24. Plain and HeadQ rows use blocks of 64 and 128 tokens so that a
    Pareto front can be drawn; the controls share one HeadQ setting. Beside them, ``quick`` and ``long``
    hold a budget row for each plain row between 2.5 and 3.5 key bits (:func:`budget_methods`): its rank
    is what that budget pays for at this head dim and window length (``seq_len``).

    ``sink_keys``: every row with quantized keys (plain and HeadQ alike, so that the comparison stays fair)
    also holds its first ``sink_keys`` keys exact, and pays for them (:class:`HeadQConfig`).
    """
    r = {n: _rank(head_dim, n) for n in (1, 2, 3, 4, 6, 8)}  # sixteenths of the head
    if profile == "core":  # the rows a transfer or regression check needs, in under a minute
        core = [
            Method("k-only", "full-precision"),
            Method("k-only", "plain", "channel", HeadQConfig(key_bits=2, rank=0)),
            Method("k-only", "headq", "channel", _headq(r[2], 4), "query"),
            Method("k-only", "headq", "channel", _headq(r[4], 3), "query"),
            Method("k-only", "random", "channel", _headq(r[4], 3), "random"),
        ]
        return [with_sink_keys(m, sink_keys) for m in core]
    methods = [Method("k-only", "full-precision")]

    def add(*new: Method) -> None:
        methods.extend(with_sink_keys(m, sink_keys) for m in new)

    blocks = (32, 64, 128) if profile == "full" else (64, 128)
    for block in blocks:
        for bits in (2, 3, 4) if profile == "full" else (2, 3):
            add(Method("k-only", "plain", "channel", HeadQConfig(key_bits=bits, rank=0, block_size=block)))
    if profile != "long":
        for bits in (2, 3):
            config = HeadQConfig(key_bits=bits, key_grouping="token", rank=0)
            add(Method("k-only", "plain", "token", config))
    # (key bits, block, rank, side bits): 2-bit keys with side codes of growing rank (on the query basis), and
    # a small side code on 3-bit keys for the top of the range. ``long`` keeps the ends of the 2.4-3.5 bit range,
    # the rest of its HeadQ front comes from the oblique and budget rows below (a 4096-token row costs minutes).
    if profile == "quick":
        grid = [(2, 64, r[1], 4), (2, 64, r[2], 4), (2, 64, r[3], 3), (2, 64, r[4], 3), (2, 128, r[1], 2)]
        grid += [(2, 128, r[3], 2), (2, 128, r[4], 3), (2, 128, r[6], 3), (3, 128, r[1], 2)]
    elif profile == "long":
        grid = [(2, 128, r[1], 2), (2, 128, r[6], 3)]
    else:
        ranks = sorted({_rank(head_dim, n) for n in (0.5, 1, 2, 3, 4, 6, 8)})
        grid = [(2, b, rank, s) for b in blocks for rank in ranks for s in (2, 3, 4)]
        grid += [(3, b, rank, s) for b in blocks for rank in ranks[:3] for s in (2, 3)]
    for key_bits, block, rank, side_bits in grid:
        config = _headq(rank, side_bits, block, key_bits=key_bits)
        add(Method("k-only", "headq", "channel", config, "query"))
    if profile in ("quick", "long"):
        # the score-optimal code where it measured better (small ranks), and a high-rank row near full precision
        for rank, side_bits in ((r[2], 4), (r[3], 3)):
            add(Method("k-only", "headq", "channel", _headq(rank, side_bits), OBLIQUE))
        add(Method("k-only", "headq", "channel", _headq(r[6], 3), "query"))
        methods += [m for m in budget_methods(methods, head_dim, seq_len, sink_keys) if m not in methods]
        methods += mixed_key_methods(methods, head_dim, seq_len, sink_keys)
    if profile != "long":
        add(Method("k-only", "headq", "token", _headq(r[2], 4, key_grouping="token"), "query"))
        for kind in ("random", "key-pca", "wrong-sign"):
            add(Method("k-only", kind, "channel", _headq(r[4], 3), kind))

    for key_bits, value_bits in ((2, 2), (3, 2), (2, 3)):
        add(Method("full-kv", "plain", "channel", HeadQConfig(key_bits=key_bits, value_bits=value_bits, rank=0)))
    if profile != "long":
        for rank, keep in ((r[1], 2), (r[2], 0), (r[2], 2)):
            config = _headq(rank, 4, value_bits=2, value_keep=keep)
            add(Method("full-kv", "headq", "channel", config, "query"))
    if profile in ("quick", "long"):  # the full-KV budget row and its plain base
        budget_row = full_kv_budget_method(head_dim, seq_len, sink_keys=sink_keys)
        assert budget_row.config is not None
        base = budget_row.config.replace(rank=0, value_keep=0, side_bits=None, side_scale="token")
        methods += [Method("full-kv", "plain", "channel", base), budget_row]
    if profile == "long":
        return methods
    control = _headq(r[2], 4, value_bits=2, value_keep=2, value_policy="position")
    add(Method("full-kv", "position-keep", "channel", control, "query"))
    add(Method("full-kv", "quanto", "token", quanto_bits=2))
    if profile == "full":
        add(Method("full-kv", "quanto", "token", quanto_bits=4))
    return methods


def control_basis(
    basis: QueryBasis, kind: str, key_pca: QueryBasis | None, seed: int = 0, oblique: QueryBasis | None = None
) -> QueryBasis:
    """The basis a row uses: the calibrated one, the oblique code calibrated beside it, or one of the
    paper's controls."""
    if kind == "query":
        return basis
    if kind == OBLIQUE:
        if oblique is None:
            raise ValueError("an oblique row needs the oblique basis (headq calibrate writes one)")
        return oblique
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
    """Next-token NLL of every predicted token, ``[B, T-1]`` float32."""
    predicted = logits[:, :-1]  # log-sum-exp minus the target's logit: no [B, T, vocab] log-softmax is written
    target = predicted.gather(-1, ids[:, 1:, None].to(predicted.device)).squeeze(-1)
    return torch.logsumexp(predicted.float(), dim=-1) - target.float()


@torch.no_grad()
def forward_nll(model: Any, ids: torch.Tensor, cache: Any | None) -> torch.Tensor:
    """Next-token NLL ``[B, T-1]`` of ``ids`` [B, T] in one forward through ``cache`` (None: no cache)."""
    out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=cache is not None)
    return _nll(out.logits, ids)


@torch.no_grad()
def chunked_nll(model: Any, ids: torch.Tensor, cache: Any, chunks: list[int]) -> torch.Tensor:
    """Next-token NLL ``[B, T-1]`` of ``ids`` [B, T] fed through ``cache`` in calls of ``chunks`` tokens
    (all ones: a true token-by-token decode)."""
    if sum(chunks) != ids.shape[1]:
        raise ValueError(f"chunks of {sum(chunks)} tokens do not cover a window of {ids.shape[1]}")
    kwargs = cache_kwargs(model, cache)
    logits, start = [], 0
    for size in chunks:
        logits.append(model(input_ids=ids[:, start : start + size], **kwargs, use_cache=True).logits)
        start += size
    return _nll(torch.cat(logits, dim=1), ids)


def token_losses(
    model: Any,
    windows: torch.Tensor,
    make_cache: Callable[[], Any] | None,
    chunks: list[int] | None = None,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Next-token NLL ``[n, T-1]`` over ``windows`` [n, T]; each batch starts from a fresh cache.

    ``chunks``: tokens per model call (None: the whole window in one forward). ``on_batch(windows_done)``
    is called after each batch (progress)."""
    device = next(model.parameters()).device
    parts = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        cache = None if make_cache is None else make_cache()
        nll = forward_nll(model, ids, cache) if chunks is None else chunked_nll(model, ids, cache, chunks)
        parts.append(nll.cpu())
        if on_batch is not None:
            on_batch(ids.shape[0])
    return torch.cat(parts)


def perplexity(
    model: Any,
    windows: torch.Tensor,
    make_cache: Callable[[], Any] | None,
    chunks: list[int] | None = None,
    batch_size: int = 1,
) -> float:
    """Perplexity over ``windows`` [n, T]; each window starts from a fresh cache."""
    return math.exp(float(token_losses(model, windows, make_cache, chunks, batch_size).double().mean()))


# ---------------------------------------------------------------- quanto
def quanto_cache(model: Any, bits: int, residual: int = QUANTO_RESIDUAL) -> Any:
    """transformers' quanto ``QuantizedCache`` for ``model`` with the settings this project compares against."""
    from transformers import QuantizedCache

    head_dim = model_fingerprint(model.config)["head_dim"]
    return QuantizedCache(
        backend="quanto",
        config=model.config,
        nbits=bits,
        q_group_size=min(QUANTO_GROUP, head_dim),
        residual_length=residual,
    )


def quanto_chunks(seq_len: int, residual: int = QUANTO_RESIDUAL) -> list[int]:
    """Model calls that show every query what a token-by-token decode through quanto would show it.

    transformers' ``QuantizedLayer`` quantizes the first call's tokens, then keeps later tokens exact
    in a residual until a call brings it to ``residual`` tokens, when it re-quantizes everything. In a
    decode that happens after tokens ``residual``, ``2 residual``, ...; a call that ends exactly there
    shows each of its queries the same quantized past and exact residual as the decode steps would.
    So one token, then calls of ``residual`` tokens, replace ``seq_len`` decode steps (a test holds
    this to a true token-by-token decode).
    """
    if seq_len < 1:
        return []
    rest = seq_len - 1
    return [1] + [residual] * (rest // residual) + ([rest % residual] if rest % residual else [])


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
    oblique: QueryBasis | None = None


def _dense_attention(model: Any) -> None:
    """Back to transformers' own attention: sdpa, or eager for families without an sdpa path (Gemma 2)."""
    try:
        model.set_attn_implementation("sdpa")
    except ValueError:
        model.set_attn_implementation("eager")


def skip_reason(setup: EvalSetup, method: Method) -> str | None:
    """Why ``method`` cannot run on this setup's model or machine, or None if it can."""
    if method.quanto_bits is not None:
        import importlib.util

        if importlib.util.find_spec("optimum.quanto") is None:
            return "optimum-quanto is not installed (pip install 'transformers-headq[baselines]')"
        if any(w is not None for w in sliding_windows(setup.model.config)):
            return "transformers' QuantizedCache does not support sliding-window layers, which this model has"
    if method.basis_kind == "key-pca" and setup.key_pca is None:
        return "no key-PCA basis beside the query basis (headq calibrate writes one in OUTPUT/key-pca)"
    if method.basis_kind == OBLIQUE and setup.oblique is None:
        return "no oblique basis beside the query basis (headq calibrate writes one in OUTPUT/oblique)"
    if method.basis_kind is not None and method.rank > setup.basis.rank:
        return (
            f"rank {method.rank} needs {method.rank} calibrated directions, the basis holds {setup.basis.rank} "
            "(calibrate with --rank 0 to keep all of them)"
        )
    mixed = method.config is not None and method.config.mixed_key_bits is not None
    if mixed and any(layer.key_channel_weight is None for layer in setup.basis.layers):
        return "the basis has no key channel weights for per-channel key widths (recalibrate with headq calibrate)"
    return None


def evaluate_method(setup: EvalSetup, method: Method, on_batch: Callable[[int], None] | None = None) -> Row:
    """Perplexity (with its interval) and stored bits of one method on the setup's windows."""
    model, windows = setup.model, setup.windows
    fp = model_fingerprint(model.config)
    head_dim, seq_len = fp["head_dim"], windows.shape[1]
    side_bits = None
    if method.config is None:
        _dense_attention(model)
    if method.quanto_bits is not None:
        cache = quanto_cache(model, method.quanto_bits)
        chunks = quanto_chunks(seq_len)
        losses = token_losses(model, windows, lambda: cache, chunks, windows.shape[0], on_batch)
        key_bits, value_bits = quanto_bits_per_element(cache)
    elif method.config is None:
        losses = token_losses(model, windows, None, batch_size=setup.batch_size, on_batch=on_batch)
        key_bits = value_bits = 16.0
    else:
        config = method.config
        basis = None
        if method.basis_kind is not None:
            chosen = control_basis(setup.basis, method.basis_kind, setup.key_pca, oblique=setup.oblique)
            basis = chosen.with_rank(method.rank)
            side_bits = config.side_bits

        # Plain rows too need the headq attention: it is what makes a one-forward prefill decode-exact.
        enable_headq_attention(model)

        caches: list[HeadQCache] = []

        def make_cache() -> HeadQCache:
            caches.append(HeadQCache(basis, config, num_layers=fp["num_hidden_layers"]))
            return caches[-1]

        losses = token_losses(model, windows, make_cache, batch_size=setup.batch_size, on_batch=on_batch)
        code_bits = caches[0].key_code_bits()  # per-channel widths: what their allocation stores
        cost = bits_per_element(config, head_dim, method.rank, seq_len, DEPLOY_DTYPE, code_bits)
        key_bits, value_bits = cost.key, cost.value
    sums, counts = block_sums(losses)
    low, high = perplexity_interval(sums, counts, draws(len(sums)))
    return Row(
        **_row_labels(setup, method),
        side_bits=side_bits,
        key_bits=round(key_bits, 4),
        value_bits=round(value_bits, 4),
        ppl=math.exp(float(losses.double().mean())),
        tokens=losses.numel(),
        ppl_low=low,
        ppl_high=high,
        block_nll=sums,
        block_tokens=counts,
        position_nll=[float(part.double().mean()) for part in losses.tensor_split(POSITION_BUCKETS, dim=1)],
    )


def _row_labels(setup: EvalSetup, method: Method) -> dict[str, Any]:
    return {
        "model": setup.model_name,
        "corpus": setup.corpus_name,
        "mode": method.mode,
        "method": method.method,
        "setting": method.setting,
        "base_setting": method.base_setting,
        "grouping": method.grouping,
        "rank": method.rank,
    }


def skipped_row(setup: EvalSetup, method: Method, reason: str) -> Row:
    """A table row that says why ``method`` has no result."""
    labels = _row_labels(setup, method)
    return Row(**labels, side_bits=None, key_bits=math.nan, value_bits=math.nan, ppl=math.nan, tokens=0, skipped=reason)


def run_evaluation(
    setup: EvalSetup,
    methods: Iterable[Method],
    progress: bool = True,
    on_row: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Evaluate ``methods`` in order; a row that cannot run is skipped with its reason, never fatal.

    ``on_row(rows so far)`` is called as each row finishes, so a caller can write results as they
    come and an interrupted run keeps what it finished. A row that raises is kept as skipped with
    the error (``failed: ...``), and the run goes on to the next one.
    """
    methods = list(methods)
    rows: list[Row] = []
    bar = _progress(len(methods) * setup.windows.shape[0], progress)
    for method in methods:
        bar.set_description(f"{method.mode} {method.method} {method.setting}")
        reason = skip_reason(setup, method)
        if reason is None:
            try:
                row = evaluate_method(setup, method, on_batch=bar.update)
            except Exception as exc:  # one broken row must not lose the others
                row = skipped_row(setup, method, f"failed: {type(exc).__name__}: {exc}")
        else:
            row = skipped_row(setup, method, reason)
        bar.n = len(rows) * setup.windows.shape[0] + setup.windows.shape[0]
        bar.refresh()
        rows.append(row)
        annotate_removed(rows)
        if on_row is not None:
            on_row(rows)
    bar.close()
    return rows


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar over windows (all rows together)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="window", disable=not enabled)


# --------------------------------------------------------------- summary
def excess_removed(fp: Row, headq: Row, base: Row) -> float:
    """Share of the base quantizer's excess perplexity that ``headq`` removes."""
    return removed_share(fp.ppl, headq.ppl, base.ppl)


def _base_of(rows: list[Row], row: Row) -> Row | None:
    """The plain row ``row`` adds its side code (or kept values) to, if it ran."""
    return next(
        (r for r in rows if r.ok and r.method == "plain" and (r.mode, r.setting) == (row.mode, row.base_setting)),
        None,
    )


def annotate_removed(rows: list[Row]) -> None:
    """Fill ``removed`` and its paired interval on rows with a side code whose base and full-precision
    rows have run (in place; rows already annotated are left as they are)."""
    fp = next((r for r in rows if r.ok and r.method == "full-precision"), None)
    if fp is None or not fp.block_nll:
        return
    index = draws(len(fp.block_nll))  # the same draws for every row: paired with full precision
    for r in rows:
        base = _base_of(rows, r)
        if r.removed is not None or not r.ok or r.method in ("plain", "full-precision") or base is None:
            continue
        if base.ppl <= fp.ppl or len({len(x.block_nll) for x in (fp, r, base)}) != 1:
            continue
        r.removed = excess_removed(fp, r, base)
        parts = [(x.block_nll, x.block_tokens) for x in (fp, r, base)]
        r.removed_low, r.removed_high = removed_interval(parts[0], parts[1], parts[2], index)


def markdown_table(rows: list[Row]) -> str:
    """The results table: perplexity with its 95% interval, and the share of excess removed."""
    lines = [
        "| mode | method | setting | key bits/elem | value bits/elem | PPL | 95% interval | excess removed |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r.ok:
            lines.append(f"| {r.mode} | {r.method} | {r.setting} | - | - | skipped: {r.skipped} | | |")
            continue
        removed = ""
        if r.removed is not None and r.removed_low is not None and r.removed_high is not None:
            removed = f"{100 * r.removed:.1f}% [{100 * r.removed_low:.1f}, {100 * r.removed_high:.1f}]"
        lines.append(
            f"| {r.mode} | {r.method} | {r.setting} | {r.key_bits:.3f} | {r.value_bits:.3f} | {r.ppl:.3f} "
            f"| {r.ppl_low:.2f}-{r.ppl_high:.2f} | {removed} |"
        )
    return "\n".join(lines)


def position_table(rows: list[Row], seq_len: int) -> str:
    """Does a side code help as much late in a window as early? Per span of the window, the excess
    perplexity of the plain base of the best K-only HeadQ row on 2-bit keys and the share of it the row removes."""
    fp = next((r for r in rows if r.ok and r.method == "full-precision" and r.position_nll), None)
    candidates = [
        r
        for r in rows
        if r.method == "headq" and r.mode == "k-only" and r.removed is not None and r.base_setting.startswith("K2/")
    ]
    best = max(candidates, key=lambda r: r.removed or 0.0, default=None)
    base = None if best is None else _base_of(rows, best)
    if fp is None or best is None or base is None:
        return ""
    lines = [
        f"Excess perplexity by position in the window: {best.setting} against plain {base.setting}",
        "",
        "| predicted tokens | full PPL | plain PPL | HeadQ PPL | excess removed |",
        "|---|---:|---:|---:|---:|",
    ]
    spans = torch.arange(1, seq_len).tensor_split(len(fp.position_nll))  # token t is predicted from 0..t-1
    for span, f, h, b in zip(spans, fp.position_nll, best.position_nll, base.position_nll, strict=True):
        full, headq, plain = math.exp(f), math.exp(h), math.exp(b)
        share = f"{100 * removed_share(full, headq, plain):.1f}%" if plain > full else "-"
        lines.append(f"| {int(span[0])}-{int(span[-1])} | {full:.2f} | {plain:.2f} | {headq:.2f} | {share} |")
    return "\n".join(lines)


def pareto_front(rows: list[Row], bits: Callable[[Row], float]) -> list[Row]:
    """Rows no other row beats on both bits and perplexity, sorted by bits (skipped rows left out)."""
    ordered = sorted((r for r in rows if r.ok), key=lambda r: (bits(r), r.ppl))
    front: list[Row] = []
    for r in ordered:
        if not front or r.ppl < front[-1].ppl:
            front.append(r)
    return front


def plot_results(rows: list[Row], path: str, low_bits: float = 2.0, high_bits: float = 4.0) -> None:
    """Where a user decides: PPL against bits in ``[low_bits, high_bits]``, K-only and full-KV panels.

    Full precision is a line; each method's Pareto front is drawn with its 95% intervals; rows above
    the plotted range (a control gone wrong, a collapsed quantizer) are arrows at the top edge with
    their perplexity written beside them, so they neither squash the rest nor vanish.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[Mode, Callable[[Row], float], str]] = [
        ("k-only", lambda r: r.key_bits, "bits per key element"),
        ("full-kv", lambda r: (r.key_bits + r.value_bits) / 2, "bits per K/V element (mean)"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    full = next((r for r in rows if r.ok and r.method == "full-precision"), None)
    for ax, (mode, bits, xlabel) in zip(axes, panels, strict=True):
        chosen = [r for r in rows if r.ok and r.mode == mode and low_bits <= bits(r) <= high_bits]
        methods = dict.fromkeys(r.method for r in chosen)
        fronts = {m: pareto_front([r for r in chosen if r.method == m], bits) for m in methods}
        shown = [r for front in fronts.values() for r in front if r.method in ("plain", "headq")] or chosen
        floor = min([r.ppl_low for r in shown] + ([full.ppl] if full else []), default=1.0)
        ceiling = 1.15 * max((r.ppl_high for r in shown), default=floor * 2)
        for method, front in fronts.items():
            inside = [r for r in front if r.ppl <= ceiling]
            if inside:
                err = [[r.ppl - r.ppl_low for r in inside], [r.ppl_high - r.ppl for r in inside]]
                ax.errorbar([bits(r) for r in inside], [r.ppl for r in inside], yerr=err, marker="o", capsize=3,
                            label=method, linewidth=2 if method in ("plain", "headq") else 1)  # fmt: skip
            for r in front:
                if r.ppl > ceiling:
                    ax.annotate(f"{method} {r.ppl:.0f}", xy=(bits(r), ceiling), xytext=(bits(r), ceiling * 0.93),
                                ha="center", fontsize=7, arrowprops={"arrowstyle": "->"})  # fmt: skip
        if full is not None:
            ax.axhline(full.ppl, color="black", linestyle="--", linewidth=1, label=f"full precision {full.ppl:.2f}")
        ax.set_xlim(low_bits, high_bits)
        ax.set_ylim(floor * 0.98, ceiling)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (95% interval)")
        ax.set_title(mode)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def headline(rows: list[Row]) -> list[str]:
    """Share of the excess perplexity each K-only HeadQ row removes from its plain base quantizer."""
    lines = []
    for r in rows:
        base = _base_of(rows, r)
        if r.method != "headq" or r.mode != "k-only" or base is None or r.removed is None:
            continue
        change = f"{base.ppl:.2f} -> {r.ppl:.2f}"
        interval = f"95% interval {100 * r.removed_low:.1f}-{100 * r.removed_high:.1f}%"  # type: ignore[operator]
        lines.append(
            f"{r.setting}: removes {100 * r.removed:.1f}% ({interval}) of the excess PPL of plain {base.setting} "
            f"({change})"
        )
    return lines


def fair_budget_losses(
    rows: list[Row], low: float = FRONT_BITS[0], high: float = FRONT_BITS[1]
) -> list[tuple[float, float, Row, Row | None]]:
    """Key-bit budgets in ``[low, high]`` where HeadQ's best K-only row at or below the budget does
    not beat the best plain row at or below it, as ``(from, to, best plain, best headq or None)``: the
    budgets from ``from`` up to ``to`` (excluded), or the budget ``high`` alone when ``from == to == high``
    (a plain row with exactly ``high`` bits is in the range too)."""
    k_only = [r for r in rows if r.ok and r.mode == "k-only" and r.method in ("plain", "headq")]
    budgets = sorted({low} | {r.key_bits for r in k_only if low <= r.key_bits <= high})
    losses: list[tuple[float, float, Row, Row | None]] = []
    for start, end in zip(budgets, [*budgets[1:], high], strict=True):
        plain = _best(k_only, "plain", start)
        headq = _best(k_only, "headq", start)
        if plain is None or (headq is not None and headq.ppl < plain.ppl):
            continue
        merge = losses and start < end and losses[-1][1] == start
        if merge and losses[-1][2] is plain and losses[-1][3] is headq:
            losses[-1] = (losses[-1][0], end, plain, headq)
        else:
            losses.append((start, end, plain, headq))
    return losses


def _best(rows: list[Row], method: str, budget: float) -> Row | None:
    return min((r for r in rows if r.method == method and r.key_bits <= budget), key=lambda r: r.ppl, default=None)


def fair_budget_summary(rows: list[Row], low: float = FRONT_BITS[0], high: float = FRONT_BITS[1]) -> str:
    """One line: where, in ``[low, high]`` key bits, HeadQ's front is below the plain front or not."""
    losses = fair_budget_losses(rows, low, high)
    if not losses:
        return f"Fair budget: at every key budget in [{low}, {high}] bits HeadQ's best row beats the best plain row."
    parts = []
    for start, end, plain, headq in losses:
        theirs = "no HeadQ row" if headq is None else f"HeadQ {headq.setting} {headq.ppl:.2f}"
        where = f"{start:.3f} bits" if start == end else f"[{start:.3f}, {end:.3f}) bits"
        parts.append(f"{where}: plain {plain.setting} {plain.ppl:.2f} vs {theirs}")
    return f"Fair budget: HeadQ's best row beats the best plain row in [{low}, {high}] bits except " + "; ".join(parts)
