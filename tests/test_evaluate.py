"""The eval harness: its one-forward perplexity is a true decode's, and rows report what they store."""

from __future__ import annotations

import json

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig, enable_headq_attention
from transformers_headq.evaluate import (
    EvalSetup,
    Method,
    Row,
    evaluate_method,
    fair_budget_losses,
    fair_budget_summary,
    headline,
    markdown_table,
    pareto_front,
    perplexity,
    plot_results,
)

from .helpers import random_basis, tiny_model

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
    slow = perplexity(model, WINDOWS, make, decode=True, batch_size=2)
    assert fast == pytest.approx(slow, rel=1e-4)
    dense = perplexity(model, WINDOWS, None)
    assert fast != pytest.approx(dense, rel=1e-6)  # the quantizer did something


def _setup() -> EvalSetup:
    model = tiny_model()
    basis = random_basis(model, 8)
    return EvalSetup(model, "tiny", "random ids", WINDOWS, basis, random_basis(model, 8, seed=9), batch_size=2)


def test_rows_state_bits_and_controls_run():
    setup = _setup()
    config = HeadQConfig(rank=4, side_bits=4, side_scale="block", block_size=8)
    methods = [
        Method("k-only", "full-precision"),
        Method("k-only", "plain", "channel", config.replace(rank=0)),
        Method("k-only", "headq", "channel", config, "query"),
        Method("k-only", "wrong-sign", "channel", config, "wrong-sign"),
        Method("k-only", "random", "channel", config, "random"),
        Method("k-only", "key-pca", "channel", config, "key-pca"),
    ]
    rows = [evaluate_method(setup, m) for m in methods]
    assert rows[0].key_bits == rows[0].value_bits == 16.0
    # 2 bits + fp16 scale and zero per channel per 8 tokens = 6 bits; the side code adds 4*4/16 + 2*16*4/(8*16).
    assert rows[1].key_bits == pytest.approx(6.0)
    assert rows[2].key_bits == pytest.approx(6.0 + 1.0 + 1.0)
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
    return Row("m", "c", "k-only", method, setting, base, "channel", 0, None, bits, 16.0, ppl, 10)


def test_headline_pareto_table_json_and_plot(tmp_path):
    rows = [
        _row("full-precision", "-", "-", 16.0, 10.0),
        _row("plain", "K2/channel", "K2/channel", 2.5, 20.0),
        _row("plain", "K3/channel", "K3/channel", 3.5, 11.0),
        _row("headq", "K2/channel r8 s4/block", "K2/channel", 3.0, 11.5),
        _row("headq", "K2/channel r4 s4/block", "K2/channel", 2.8, 13.0),
    ]
    assert headline(rows)[0].startswith("K2/channel r8 s4/block: removes 85.0% of the excess PPL")
    front = pareto_front(rows, lambda r: r.key_bits)
    assert [r.setting for r in front] == [
        "K2/channel",
        "K2/channel r4 s4/block",
        "K2/channel r8 s4/block",
        "K3/channel",
        "-",  # full precision: most bits, lowest perplexity
    ]
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 11.500 |" in table
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
