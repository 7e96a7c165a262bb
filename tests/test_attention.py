"""The headq attention: softmax-null translations, lossless side codes, the query basis' edge,
chunking, and the Σp² accumulator."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformers_headq import HeadQCache, HeadQConfig, QueryBasis, headq_attention_forward
from transformers_headq.basis import LayerBasis
from transformers_headq.calibrate import QueryMoments
from transformers_headq.metrics import score_error

from .helpers import random_orthonormal

MODULE = torch.nn.Module().eval()


def _fingerprint(heads: int, dim: int, layers: int = 1) -> dict:
    return {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": dim,
        "rope": {},
    }


def _basis(U: torch.Tensor) -> QueryBasis:
    heads, dim, _ = U.shape
    layer = LayerBasis(U=U, eigenvalues=torch.ones(heads, dim), query_mean=torch.zeros(heads, dim))
    return QueryBasis(layers=[layer], fingerprint=_fingerprint(heads, dim))


def _attend(cache: HeadQCache, keys, values, queries, prefix: int):
    """Prefill ``prefix`` tokens, then attend with ``queries`` [B, Hq, Q, D] while adding the rest."""
    cache.update(keys[:, :, :prefix], values[:, :, :prefix], 0)
    k, v = cache.update(keys[:, :, prefix:], values[:, :, prefix:], 0)
    out, _ = headq_attention_forward(MODULE, queries, k, v, None)
    return out


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    dim=st.sampled_from([4, 8, 16]),
    tokens=st.integers(2, 40),
    queries=st.integers(1, 2),
    block=st.integers(1, 9),
    seed=st.integers(0, 10_000),
)
def test_shared_key_translation_is_softmax_null(batch, heads, groups, dim, tokens, queries, block, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, tokens, dim, generator=gen, dtype=torch.float64).float()
    values = torch.randn(batch, heads, tokens, dim, generator=gen)
    q = torch.randn(batch, heads * groups, queries, dim, generator=gen)
    shift = 5 * torch.randn(batch, heads, 1, dim, generator=gen)
    config = HeadQConfig(key_bits=None, value_bits=None, rank=0, block_size=block)
    prefix = tokens - queries
    base = _attend(HeadQCache(config=config, num_layers=1), keys, values, q, prefix)
    moved = _attend(HeadQCache(config=config, num_layers=1), keys + shift, values, q, prefix)
    torch.testing.assert_close(moved, base, atol=2e-5, rtol=1e-4)


def test_full_rank_lossless_side_code_recovers_exact_attention():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 48, 16, generator=gen), torch.randn(2, 2, 48, 16, generator=gen)
    q = torch.randn(2, 4, 3, 16, generator=gen) * 3
    exact = _attend(
        HeadQCache(config=HeadQConfig(key_bits=None, rank=0, block_size=8), num_layers=1), keys, values, q, 45
    )
    plain = _attend(HeadQCache(config=HeadQConfig(key_bits=2, rank=0, block_size=8), num_layers=1), keys, values, q, 45)
    basis = _basis(random_orthonormal(2, 16, 16))
    headq = _attend(HeadQCache(basis, HeadQConfig(key_bits=2, side_bits=None, block_size=8)), keys, values, q, 45)
    assert (plain - exact).abs().max() > 1e-2  # 2-bit keys alone do change the output
    torch.testing.assert_close(headq, exact, atol=1e-5, rtol=1e-5)


def _anisotropic_queries(n: int, heads: int, dim: int, seed: int) -> torch.Tensor:
    """Queries concentrated on a few directions, as real post-RoPE queries are."""
    gen = torch.Generator().manual_seed(seed)
    rotation = random_orthonormal(heads, dim, dim, seed=99)
    spread = 0.6 ** torch.arange(dim, dtype=torch.float32)
    z = torch.randn(heads, n, dim, generator=gen) * spread
    return (z @ rotation.transpose(-1, -2)).unsqueeze(0)  # [1, H, n, D]


def test_query_basis_beats_random_basis_and_wrong_sign_is_worse_than_none():
    heads, dim, rank = 2, 32, 4
    moments = QueryMoments(heads, dim)
    moments.add(_anisotropic_queries(4000, heads, dim, seed=1))
    calibrated = QueryBasis(layers=[moments.to_layer_basis(rank)], fingerprint=_fingerprint(heads, dim))
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(1, heads, 256, dim, generator=gen) + torch.linspace(-2, 2, dim)
    test_queries = _anisotropic_queries(512, heads, dim, seed=2)
    config = HeadQConfig(key_bits=2, side_bits=4, block_size=64)

    def error(basis: QueryBasis | None) -> float:
        cache = HeadQCache(basis, config) if basis else HeadQCache(config=config.replace(rank=0), num_layers=1)
        cache.update(keys, keys, 0)
        return score_error(test_queries, keys, cache.layers[0].effective_keys())

    none, query = error(None), error(calibrated)
    random, flipped = error(QueryBasis.random(calibrated, seed=5)), error(calibrated.flipped())
    assert query < 0.5 * none  # the calibrated basis removes most of the score error
    assert query < random < none
    assert flipped > none


def test_chunked_path_matches_single_chunk_and_tracks_squared_attention():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 50, 8, generator=gen), torch.randn(1, 2, 50, 8, generator=gen)
    q = torch.randn(1, 4, 2, 8, generator=gen)
    U = random_orthonormal(2, 8, 3)
    outs, masses = [], []
    for chunk in (4, 4096):
        config = HeadQConfig(key_bits=2, value_bits=3, block_size=4, chunk_size=chunk, track_attention=True)
        cache = HeadQCache(_basis(U), config)
        outs.append(_attend(cache, keys, values, q, 48))
        masses.append(cache.attention_mass(0).clone())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masses[0], masses[1], atol=1e-6, rtol=1e-5)

    # Σp² against attention computed densely from the effective keys the layer exposes.
    config = HeadQConfig(key_bits=None, value_bits=None, rank=0, block_size=4, track_attention=True)
    cache = HeadQCache(config=config, num_layers=1)
    _attend(cache, keys, values, q, 48)
    logits = q.reshape(1, 2, 4, 8) @ keys.transpose(-1, -2) / 8**0.5
    causal = torch.arange(50)[None, :] <= torch.tensor([48, 49]).repeat(2)[:, None]
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    expected = p.square().sum(-2)
    torch.testing.assert_close(cache.attention_mass(0), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [4, 4096])
@pytest.mark.parametrize("memo_bytes", [0, 1000, 1 << 30])
def test_a2_passes_give_the_same_result_with_scores_kept_or_recomputed(monkeypatch, chunk, memo_bytes):
    """The A² passes reuse each chunk's scores while they fit the memo budget (none, some chunks, all):
    outputs, the kept tokens' choice and the attention mass are those of recomputing every pass."""
    import transformers_headq.attention as attention

    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 2, 41, 8, generator=gen), torch.randn(2, 2, 41, 8, generator=gen)
    q = torch.randn(2, 4, 25, 8, generator=gen)
    U = random_orthonormal(2, 8, 3)
    config = HeadQConfig(key_bits=2, value_bits=2, block_size=4, chunk_size=chunk, value_keep=1, track_attention=True)
    results = []
    for budget in (0, memo_bytes):
        monkeypatch.setattr(attention, "SCORE_MEMO_BYTES", budget)
        cache = HeadQCache(_basis(U), config)
        out = _attend(cache, keys, values, q, 16)
        results.append((out, cache.attention_mass(0).clone(), cache.layers[0].read_values(0, 40).clone()))
    for reference, measured in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(measured, reference, atol=0, rtol=0)


def test_attention_without_cache_is_plain_causal_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=gen) for _ in range(3))
    out, _ = headq_attention_forward(MODULE, q, k, v, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_dropout_in_training_is_refused():
    module = torch.nn.Module().train()
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="model.eval"):
        headq_attention_forward(module, q, q, q, None, dropout=0.1)


def _masks(kind: str, batch: int, q_len: int, kv_len: int, gen: torch.Generator) -> torch.Tensor | None:
    """No mask (causal), or transformers' boolean / additive sdpa mask with left padding."""
    if kind == "none":
        return None
    rows = kv_len - q_len + torch.arange(q_len)
    allowed = torch.arange(kv_len)[None, :] <= rows[:, None]
    pad = torch.randint(0, 3, (batch,), generator=gen)
    allowed = allowed[None, None] & (torch.arange(kv_len)[None, None, None, :] >= pad[:, None, None, None])
    allowed[..., 0, :] = False  # a padding query that sees nothing: both paths give it zeros
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    groups=st.integers(1, 3),
    tokens=st.integers(3, 40),
    new=st.integers(2, 20),
    block=st.integers(1, 9),
    rank=st.integers(0, 8),
    value_bits=st.sampled_from([None, 2]),
    keep=st.integers(0, 1),
    side_scale=st.sampled_from(["token", "block"]),
    mask_kind=st.sampled_from(["none", "bool", "additive"]),
    rows_per_call=st.sampled_from([3, 2048]),
    seed=st.integers(0, 10_000),
)
def test_multi_token_sdpa_path_matches_the_reference(
    batch, heads, groups, tokens, new, block, rank, value_bits, keep, side_scale, mask_kind, rows_per_call, seed
):
    """A prefill or chunk through sdpa over effective keys gives the reference walk's outputs,
    fresh blocks (seen exactly by earlier rows) and the position value policy included."""
    from transformers_headq import attention, effective_sdpa

    new = min(new, tokens - 1)
    gen = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(batch, heads, tokens, 8, generator=gen) for _ in range(2))
    q = torch.randn(batch, heads * groups, new, 8, generator=gen)
    mask = _masks(mask_kind, batch, new, tokens, gen)
    keep = min(keep, block) if value_bits else 0
    config = HeadQConfig(
        key_bits=2,
        value_bits=value_bits,
        rank=rank,
        side_bits=3,
        block_size=block,
        value_keep=keep,
        value_policy="position",
        side_scale=side_scale,
    )
    outs = []
    for by_sdpa in (True, False):
        cache = HeadQCache(_basis(random_orthonormal(heads, 8, 8)), config)
        cache.update(keys[:, :, : tokens - new], values[:, :, : tokens - new], 0)
        k, v = cache.update(keys[:, :, tokens - new :], values[:, :, tokens - new :], 0)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(attention, "PREFILL_BY_SDPA", by_sdpa)
            patch.setattr(effective_sdpa, "ROWS_PER_CALL", rows_per_call)  # several calls when smaller than new
            outs.append(headq_attention_forward(MODULE, q, k, v, mask)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-4)
