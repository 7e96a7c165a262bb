"""Decode-speed comparison (``headq bench``): what it fills, measures and reports (CPU; times are not checked)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from transformers_headq import HeadQConfig
from transformers_headq.factory import HeadQCacheFactory
from transformers_headq.speed import compare_decode_speed, fill_with_random_states, markdown_table

from .helpers import random_basis

K2V2 = HeadQConfig(key_bits=2, value_bits=2, block_size=16, rank=4, side_bits=4)


def test_random_fill_reaches_the_context_in_every_layer(llama):
    from transformers import DynamicCache

    cache = DynamicCache()
    fill_with_random_states(llama, cache, batch=2, context=37)
    assert cache.get_seq_length() == 37
    assert all(layer.keys.shape == (2, llama.config.num_key_value_heads, 37, 16) for layer in cache.layers)
    assert all(layer.keys.dtype == llama.dtype for layer in cache.layers)


def test_compare_reports_every_cache_that_can_run_here(llama):
    factory = HeadQCacheFactory.from_pretrained(random_basis(llama, 4), llama, **K2V2.to_dict())
    skipped: list[str] = []
    rows = compare_decode_speed(
        llama, factory, batch=2, context=40, steps=3, warmup=2, block_size=16,
        caches=("dynamic", "dynamic-flash", "quanto", "headq"), on_skip=lambda name, why: skipped.append(name),
    )  # fmt: skip
    names = [r.cache for r in rows]
    expect = ["dynamic", "quanto", "headq"] if importlib.util.find_spec("optimum.quanto") else ["dynamic", "headq"]
    assert names == expect and skipped == (["dynamic-flash"] if not torch.cuda.is_available() else [])
    by_name = {r.cache: r for r in rows}
    fp = llama.config
    dense = 2 * fp.num_hidden_layers * fp.num_key_value_heads * 16 * 4  # keys and values, float32, head dim 16
    assert by_name["dynamic"].kv_bytes_per_token == dense
    assert by_name["headq"].kv_bytes_per_token < 0.5 * dense  # 2-bit codes (small heads: metadata weighs)
    for row in rows:
        assert row.steps == 3 and row.tokens_per_s == pytest.approx(2 / (row.ms_per_step / 1e3))
        assert row.ms_median > 0 and (row.gpu_busy_ms is None) == (not torch.cuda.is_available())
    table = markdown_table(rows)
    assert "| headq | 40 | 2 |" in table and "1.00x" in table


def test_unknown_cache_is_refused_by_name(llama):
    with pytest.raises(ValueError, match="unknown caches \\['static'\\]"):
        compare_decode_speed(llama, lambda: None, batch=1, context=8, caches=("dynamic", "static"))


@pytest.mark.slow
def test_bench_command_on_the_embedded_model(tmp_path):
    from transformers_headq.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        ["bench", "--context", "128", "--batch", "1", "--steps", "2", "--caches", "dynamic,headq",
         "--set", "value_bits=2", "--json", str(out), "--plot", str(tmp_path / "bench.png")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["cache"] for r in rows] == ["dynamic", "headq"]
    # two whole blocks, no window: K2 + side code + V2 with their scales, against float32 states
    assert rows[1]["kv_bytes_per_token"] < 0.25 * rows[0]["kv_bytes_per_token"]
    assert "vs dynamic" in result.output and (tmp_path / "bench.png").stat().st_size > 10_000


def test_bench_refuses_unknown_settings_by_name():
    from transformers_headq.cli import app

    result = CliRunner().invoke(app, ["bench", "--context", "64", "--set", "colour=blue"])
    assert result.exit_code == 2 and "colour" in result.output and "--set" in result.output
    result = CliRunner().invoke(app, ["bench", "--context", "64", "--set", "value_bits"])
    assert result.exit_code == 2 and "key=value" in result.output
    result = CliRunner().invoke(app, ["bench", "--context", "4k"])
    assert result.exit_code == 2 and "--context" in result.output and "4096,32768" in result.output
    result = CliRunner().invoke(app, ["bench", "--caches", "dynamic,static"])
    assert result.exit_code == 2 and "--caches" in result.output and "'static'" in result.output


def test_plot_draws_every_cache(tmp_path):
    from transformers_headq.speed import DecodeSpeed, plot_decode_speed

    rows = [
        DecodeSpeed(cache, context, 1, 4, 10.0, 10.0, 100.0 / (1 + i), 0.0, 1000.0 / (1 + i))
        for i, cache in enumerate(("dynamic", "headq"))
        for context in (64, 128)
    ]
    plot_decode_speed(rows, str(tmp_path / "speed.png"))
    assert (tmp_path / "speed.png").stat().st_size > 10_000


@pytest.mark.slow
def test_compiled_rows_run(llama):
    """The compiled rows: StaticCache and fixed-capacity HeadQ through torch.compile (no CUDA graphs on CPU)."""
    factory = HeadQCacheFactory.from_pretrained(random_basis(llama, 4), llama, **K2V2.to_dict())
    rows = compare_decode_speed(
        llama, factory, batch=2, context=40, steps=3, warmup=3, block_size=16,
        caches=("static-compiled", "headq-compiled"),
    )  # fmt: skip
    assert [r.cache for r in rows] == ["static-compiled", "headq-compiled"]
    static, headq = rows
    assert headq.kv_bytes_per_token < 0.5 * static.kv_bytes_per_token
    assert headq.cache_gib is not None and headq.cache_gib > 0 and all(r.tokens_per_s > 0 for r in rows)
