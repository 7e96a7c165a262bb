"""The eval harness: its one-forward perplexity is a true decode's, and rows report what they store."""

from __future__ import annotations

import json
import math

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig, enable_headq_attention
from transformers_headq.config import bits_per_element
from transformers_headq.evaluate import (
    DEPLOY_DTYPE,
    FULL_KV_BITS,
    EvalSetup,
    Method,
    Row,
    annotate_removed,
    budget_methods,
    evaluate_method,
    fair_budget_losses,
    fair_budget_summary,
    front_bits,
    full_kv_budget_method,
    headline,
    markdown_table,
    mixed_key_methods,
    pareto_front,
    perplexity,
    plot_results,
    quanto_bits_per_element,
    quanto_cache,
    quanto_chunks,
    run_evaluation,
    standard_methods,
    token_losses,
)

from .helpers import FAMILIES, random_basis, tiny_model

WINDOWS = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(5))
CONFIGS = {
    "k-only headq": HeadQConfig(rank=4, side_bits=3, side_scale="block", block_size=8),
    "full-kv headq a2": HeadQConfig(
        rank=4, side_bits=4, value_bits=2, block_size=8, value_keep=2, meta_dtype="float32"
    ),
    "full-kv plain": HeadQConfig(rank=0, value_bits=2, block_size=16),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_forward_perplexity_equals_token_by_token_decode(name):
    model = tiny_model()
    enable_headq_attention(model)
    config = CONFIGS[name]
    basis = random_basis(model, 4) if config.rank else None

    def make() -> HeadQCache:
        return HeadQCache(basis, config, num_layers=2)

    fast = perplexity(model, WINDOWS, make, batch_size=2)
    slow = perplexity(model, WINDOWS, make, chunks=[1] * WINDOWS.shape[1], batch_size=2)
    assert fast == pytest.approx(slow, rel=1e-4)
    dense = perplexity(model, WINDOWS, None)
    assert fast != pytest.approx(dense, rel=1e-6)  # the quantizer did something


@pytest.mark.parametrize("residual", [4, 7, 64])
def test_quanto_chunks_reproduce_its_token_by_token_decode(residual):
    pytest.importorskip("optimum.quanto")
    model = tiny_model()
    chunks = quanto_chunks(WINDOWS.shape[1], residual)
    assert sum(chunks) == WINDOWS.shape[1] and len(chunks) < WINDOWS.shape[1]
    caches = []

    def make() -> object:
        caches.append(quanto_cache(model, 2, residual))
        return caches[-1]

    fast = token_losses(model, WINDOWS, make, chunks, batch_size=2)
    slow = token_losses(model, WINDOWS, make, [1] * WINDOWS.shape[1], batch_size=2)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-4)
    dense = token_losses(model, WINDOWS, None)
    assert not torch.allclose(fast, dense, atol=1e-3)  # the quantizer did something
    assert quanto_bits_per_element(caches[0]) == quanto_bits_per_element(caches[1])


def _setup() -> EvalSetup:
    model = tiny_model()
    basis = random_basis(model, 8)
    return EvalSetup(model, "tiny", "random ids", WINDOWS, basis, random_basis(model, 8, seed=9), batch_size=2)


def test_rows_state_bits_and_controls_run():
    setup = _setup()
    config = HeadQConfig(rank=4, side_bits=4, side_scale="block", block_size=8, sink_keys=0)
    methods = [
        Method("k-only", "full-precision"),
        Method("k-only", "plain", "channel", config.replace(rank=0)),
        Method("k-only", "headq", "channel", config, "query"),
        Method("k-only", "wrong-sign", "channel", config, "wrong-sign"),
        Method("k-only", "random", "channel", config, "random"),
        Method("k-only", "key-pca", "channel", config, "key-pca"),
        Method("k-only", "plain", "channel", config.replace(rank=0, sink_keys=1)),
    ]
    rows = [evaluate_method(setup, m) for m in methods]
    assert rows[0].key_bits == rows[0].value_bits == 16.0
    # 2 bits + fp16 scale and zero per channel per 8 tokens = 6 bits; the side code adds 4*4/16 + 2*16*4/(8*16).
    assert rows[1].key_bits == pytest.approx(6.0)
    assert rows[2].key_bits == pytest.approx(6.0 + 1.0 + 1.0)
    assert rows[-1].key_bits == pytest.approx(6.0 + 16 / 40)  # one exact key, in the deployment dtype, per 40 tokens
    assert {r.value_bits for r in rows[1:]} == {16.0}
    assert len({r.ppl for r in rows}) == len(rows)
    assert all(r.tokens == 2 * 39 for r in rows)


def test_quanto_row_measures_its_own_storage():
    pytest.importorskip("optimum.quanto")
    row = evaluate_method(_setup(), Method("full-kv", "quanto", "token", quanto_bits=2))
    # 40 tokens: the prefill token and 39 decode steps never reach the 128-token residual flush.
    assert row.key_bits == pytest.approx((1 * (2 + 2 * 16 / 16) + 39 * 16) / 40)
    assert row.ppl > 1


def _row(method: str, setting: str, base: str, bits: float, ppl: float) -> Row:
    """A row of 40 tokens in 4 bootstrap blocks whose losses spread around ``log(ppl)``."""
    nll = [math.log(ppl) * 10 + d for d in (-1.0, 0.5, -0.5, 1.0)]
    return Row(
        "m", "c", "k-only", method, setting, base, "channel", 0, None, bits, 16.0, ppl, 40,
        ppl_low=ppl * 0.9, ppl_high=ppl * 1.1, block_nll=nll, block_tokens=[10] * 4,
    )  # fmt: skip


def test_headline_pareto_table_json_and_plot(tmp_path):
    rows = [
        _row("full-precision", "-", "-", 16.0, 10.0),
        _row("plain", "K2/channel", "K2/channel", 2.5, 20.0),
        _row("plain", "K3/channel", "K3/channel", 3.5, 11.0),
        _row("headq", "K2/channel r8 s4/block", "K2/channel", 3.0, 11.5),
        _row("headq", "K2/channel r4 s4/block", "K2/channel", 2.8, 13.0),
    ]
    annotate_removed(rows)
    assert headline(rows)[0].startswith("K2/channel r8 s4/block: removes 85.0% (95% interval")
    front = pareto_front(rows, lambda r: r.key_bits)
    assert [r.setting for r in front] == [
        "K2/channel",
        "K2/channel r4 s4/block",
        "K2/channel r8 s4/block",
        "K3/channel",
        "-",  # full precision: most bits, lowest perplexity
    ]
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 11.500 | 10.35-12.65 | 85.0% [" in table
    json.dumps([r.to_dict() for r in rows])
    plot_results(rows, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def _k_only_row(method: str, key_bits: float, ppl: float) -> Row:
    setting = f"{method}@{key_bits}"
    return Row("m", "c", "k-only", method, setting, setting, "channel", 0, None, key_bits, 16.0, ppl, 10)


def test_fair_budget_finds_the_budgets_where_plain_wins():
    rows = [
        _k_only_row("plain", 2.5, 70.0),
        _k_only_row("plain", 3.25, 56.6),
        _k_only_row("headq", 2.75, 60.0),
        _k_only_row("headq", 3.2, 57.3),
        _k_only_row("headq", 3.375, 56.4),
    ]
    losses = fair_budget_losses(rows)
    summary = [(a, b, p.ppl, None if h is None else h.ppl) for a, b, p, h in losses]
    # from 2.5 to 2.75 bits HeadQ has no row at or below the budget; from 3.25 plain K3 is better
    assert summary == [(2.5, 2.75, 70.0, None), (3.25, 3.375, 56.6, 57.3)]
    assert "[3.250, 3.375)" in fair_budget_summary(rows)
    assert fair_budget_losses([r for r in rows if r.key_bits not in (2.5, 3.25)]) == []
    # a plain row at exactly the top of the range counts too
    at_top = [*rows[2:], _k_only_row("plain", 3.5, 56.3)]
    assert [(a, b, p.ppl, h.ppl) for a, b, p, h in fair_budget_losses(at_top)] == [(3.5, 3.5, 56.3, 56.4)]
    assert "3.500 bits: plain" in fair_budget_summary(at_top)


def _setup_for(model, windows: torch.Tensor = WINDOWS, key_pca=None) -> EvalSetup:
    return EvalSetup(model, "tiny", "random ids", windows, random_basis(model, rank=16), key_pca, batch_size=2)


def test_rows_that_cannot_run_are_skipped_with_their_reason_and_the_run_goes_on():
    """A hybrid model: quanto refuses sliding layers; no key-PCA basis; a row that raises. Every row
    still comes back, in order, and each finished row is handed out as it finishes."""
    model = tiny_model("gemma2")
    config = HeadQConfig(rank=4, side_bits=4, side_scale="block", block_size=8)
    methods = [
        Method("k-only", "full-precision"),
        Method("full-kv", "quanto", "token", quanto_bits=2),
        Method("k-only", "key-pca", "channel", config, "key-pca"),
        Method("k-only", "headq", "channel", config.replace(rank=64), "query"),  # more than the basis holds
        Method("k-only", "plain", "token", config.replace(rank=0, key_grouping="token", channel_group=48)),  # raises
        Method("k-only", "plain", "channel", config.replace(rank=0)),
        Method("k-only", "headq", "channel", config, "query"),
    ]
    seen: list[int] = []
    rows = run_evaluation(_setup_for(model), methods, progress=False, on_row=lambda rows: seen.append(len(rows)))
    assert seen == list(range(1, len(methods) + 1))
    assert [r.setting for r in rows] == [m.setting for m in methods]
    assert "sliding-window" in rows[1].skipped or "optimum-quanto" in rows[1].skipped
    assert "key-PCA" in rows[2].skipped
    assert "the basis holds 16" in rows[3].skipped
    assert rows[4].skipped.startswith("failed: ValueError: channel group 48 does not divide 256")
    assert [r.ok for r in rows] == [True, False, False, False, False, True, True]
    assert math.isnan(rows[1].ppl) and "skipped: " in markdown_table(rows)
    json.dumps([r.to_dict() for r in rows])
    headq, plain, full = rows[6], rows[5], rows[0]
    if plain.ppl > full.ppl:  # a share of the excess is defined only when there is an excess
        assert headq.removed_low <= headq.removed <= headq.removed_high
    else:
        assert headq.removed is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_core_profile_runs_on_every_family(family):
    """`headq eval --profile core`'s rows (and quanto's, skipped where it cannot run) on each family."""
    model = tiny_model(family)
    windows = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    methods = [*standard_methods("core"), Method("full-kv", "quanto", "token", quanto_bits=2)]
    rows = run_evaluation(_setup_for(model, windows), methods, progress=False)
    failed = [(r.setting, r.skipped) for r in rows if r.skipped is not None and r.method != "quanto"]
    assert failed == []
    for r in rows:
        if r.ok:
            assert 1 < r.ppl_low <= r.ppl <= r.ppl_high < 1e4
    if family in ("gemma2", "gemma3", "mistral-sliding"):
        assert rows[-1].skipped is not None  # quanto: sliding layers


def test_paired_interval_of_the_share_removed():
    """Paired draws: a method equal to full precision removes exactly 100% in every draw, one equal
    to its base exactly 0%; unpaired draws of noisy blocks could not give such point intervals."""
    from transformers_headq.intervals import block_sums, draws, perplexity_interval, removed_interval

    gen = torch.Generator().manual_seed(0)
    full = torch.rand(3, 200, generator=gen) * 4
    base = full + 0.3 + torch.rand(3, 200, generator=gen) * 0.2
    full_b, base_b = block_sums(full), block_sums(base)
    assert len(full_b[0]) == 3 * 4 and sum(full_b[1]) == 600  # 200 tokens: blocks of 64, 64, 64, 8
    index = draws(len(full_b[0]))
    assert removed_interval(full_b, full_b, base_b, index) == pytest.approx((1.0, 1.0))
    assert removed_interval(full_b, base_b, base_b, index) == pytest.approx((0.0, 0.0))
    middle = block_sums((full + base) / 2)
    low, high = removed_interval(full_b, middle, base_b, index)
    assert 0.3 < low < high < 0.7
    ppl = math.exp(float(full.double().mean()))
    low, high = perplexity_interval(*full_b, index)
    assert low < ppl < high and high / low < 1.3


@pytest.mark.parametrize("profile", ["core", "quick", "full", "long"])
def test_side_code_ranks_follow_the_head_dimension(profile):
    """Ranks are fractions of the head: a rank-r code of s bits costs r·s/head_dim bits per key element, so
    every model gets rows over the same budgets (up to the byte padding of a packed row)."""
    small, large = standard_methods(profile, head_dim=64), standard_methods(profile, head_dim=256)
    # budget rows (below) fill each plain row's budget instead: padding makes their ranks no exact multiple
    small_budget = [*budget_methods(small, 64, 512), full_kv_budget_method(64, 512), *mixed_key_methods(small, 64, 512)]
    large_budget = [
        *budget_methods(large, 256, 512),
        full_kv_budget_method(256, 512),
        *mixed_key_methods(large, 256, 512),
    ]
    fixed_small = [m for m in small if m not in small_budget]
    fixed_large = [m for m in large if m not in large_budget]
    assert [(m.method, m.mode) for m in fixed_small] == [(m.method, m.mode) for m in fixed_large]
    assert [4 * a.rank for a in fixed_small] == [b.rank for b in fixed_large]
    if profile == "quick":  # head dim 64: the grid the README's table was made with
        assert sorted({m.rank for m in fixed_small if m.method == "headq"}) == [4, 8, 12, 16, 24]
    if profile == "long":
        assert not any(m.quanto_bits for m in small)  # no token-by-token decode loop at long windows


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("profile", ["quick", "long"])
def test_mixed_width_rows_fill_each_plain_budget(profile, head_dim):
    """Per-channel key width rows: one of 2 bits a code, and for each plain K-only budget in the fair-budget range
    the largest mean width (in sixteenths) whose nominal cost fits it."""
    seq_len = 4096 if profile == "long" else 512
    methods = standard_methods(profile, head_dim=head_dim, seq_len=seq_len)
    mixed = [m for m in methods if m.config is not None and m.config.mixed_key_bits is not None]
    assert mixed and mixed[0].config.mixed_key_bits == 2.0 and mixed[0].base_setting.startswith("K2/channel b128")

    def cost(config):
        return bits_per_element(config, head_dim, 0, seq_len, DEPLOY_DTYPE).key

    low, high = front_bits(seq_len)
    plain = {cost(m.config) for m in methods if m.method == "plain" and m.mode == "k-only"}
    for budget in (b for b in plain if low - 1e-9 <= b <= high + 1e-9):
        fitting = [m for m in mixed if cost(m.config) <= budget + 1e-9]
        best = max(fitting, key=lambda m: m.config.mixed_key_bits)
        assert cost(best.config.replace(mixed_key_bits=best.config.mixed_key_bits + 1 / 16)) > budget


@pytest.mark.parametrize("sinks", [0, 1])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("profile", ["quick", "long"])
def test_every_plain_budget_has_a_headq_row_that_fills_it(profile, head_dim, sinks):
    """For each plain K-only row with 2.5-3.5 key bits there is a HeadQ row of no more bits, and the budget row
    made for it holds the largest rank that budget pays for (one more direction would cost more); with sink
    keys, on every row that quantizes keys, paid for on both sides."""
    seq_len = 4096 if profile == "long" else 512
    methods = standard_methods(profile, head_dim=head_dim, seq_len=seq_len, sink_keys=sinks)
    quantized = [m for m in methods if m.config is not None and m.config.key_bits is not None]
    assert quantized and all(m.config.sink_keys == sinks for m in quantized)
    assert all(("sink" in m.setting) == bool(sinks) for m in quantized)

    def key_bits(m):
        return bits_per_element(m.config, head_dim, m.rank, seq_len).key

    budgets = [key_bits(m) for m in methods if m.mode == "k-only" and m.method == "plain"]
    low, high = front_bits(seq_len, sinks)
    budgets = [b for b in budgets if low - 1e-9 <= b <= high + 1e-9]
    assert max(budgets) == pytest.approx(high)  # plain 3-bit keys (3.5 bits, plus the sinks) are compared too
    headq = [m for m in methods if m.mode == "k-only" and m.method == "headq"]
    for budget in budgets:
        assert any(key_bits(m) <= budget for m in headq), budget
    made = budget_methods(methods, head_dim, seq_len, sinks)
    assert made and all(m in methods for m in made)
    for m in made:
        assert key_bits(m) <= max(budgets)
        one_more = bits_per_element(m.config, head_dim, m.rank + 1, seq_len).key
        assert any(key_bits(m) <= b < one_more for b in budgets)


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_full_kv_budget_row_fills_its_budget(head_dim, sinks):
    """The full-KV budget row stays within FULL_KV_BITS a key and a value element, and one more side-code
    direction or one more kept value per block would not (sink keys paid for)."""
    method = full_kv_budget_method(head_dim, 512, sink_keys=sinks)
    assert method.config.sink_keys == sinks
    config = method.config
    cost = bits_per_element(config, head_dim, method.rank, 512)
    assert cost.key <= FULL_KV_BITS and cost.value <= FULL_KV_BITS
    assert method.rank > 0 and config.value_keep > 0 and method.basis_kind == "oblique"
    assert bits_per_element(config, head_dim, method.rank + 1, 512).key > FULL_KV_BITS
    more = config.replace(value_keep=config.value_keep + 1)
    assert bits_per_element(more, head_dim, method.rank, 512).value > FULL_KV_BITS
