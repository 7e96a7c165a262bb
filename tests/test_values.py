"""The A² value policy keeps, per block, the tokens attention reads most, exactly."""

from __future__ import annotations

import torch

from transformers_headq import HeadQCache, HeadQConfig, headq_attention_forward

from .test_attention import MODULE


def _sink_inputs(tokens: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries that attend strongly to token 0 (head 0) and token 5 (head 1)."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, tokens, 8, generator=gen) * 0.1
    values = torch.randn(1, 2, tokens, 8, generator=gen)
    keys[0, 0, 0, 0] = 6.0
    keys[0, 1, 5, 0] = 6.0
    queries = torch.randn(1, 2, tokens, 8, generator=gen) * 0.1
    queries[..., 0] = 3.0
    return queries, keys, values


def _run(config: HeadQConfig) -> tuple[HeadQCache, torch.Tensor, torch.Tensor]:
    queries, keys, values = _sink_inputs()
    cache = HeadQCache(None, config.replace(rank=0), num_layers=1)
    k, v = cache.update(keys, values, 0)
    headq_attention_forward(MODULE, queries, k, v, None)
    return cache, keys, values


def test_a2_keeps_the_most_read_token_of_each_block_exactly():
    cache, _, values = _run(HeadQConfig(key_bits=None, value_bits=2, block_size=8, value_keep=1))
    layer = cache.layers[0]
    assert layer.kept.offsets.data[0, 0, 0].item() == 0  # head 0: the sink in block 0
    assert layer.kept.offsets.data[0, 1, 0].item() == 5  # head 1: token 5
    read = layer.read_values(0, 16)
    torch.testing.assert_close(read[0, 0, 0], values[0, 0, 0], rtol=0, atol=0)
    torch.testing.assert_close(read[0, 1, 5], values[0, 1, 5], rtol=0, atol=0)
    plain = HeadQCache(None, HeadQConfig(key_bits=None, value_bits=2, block_size=8, rank=0), num_layers=1)
    plain.update(*_sink_inputs()[1:], 0)
    assert not torch.equal(plain.layers[0].read_values(0, 16)[0, 1, 5], values[0, 1, 5])


def test_a2_lowers_output_error_against_position_control():
    queries, _, _ = _sink_inputs()
    errors = {}
    for policy in ("a2", "position"):
        cache, keys, values = _run(
            HeadQConfig(key_bits=None, value_bits=2, block_size=8, value_keep=1, value_policy=policy)
        )
        k, v = cache.update(keys[:, :, :1] * 0, values[:, :, :1] * 0, 0)  # one more step reads both blocks quantized
        out, _ = headq_attention_forward(MODULE, queries[:, :, -1:], k, v, None)
        exact = torch.nn.functional.scaled_dot_product_attention(
            queries[:, :, -1:], torch.cat([keys, keys[:, :, :1] * 0], 2), torch.cat([values, values[:, :, :1] * 0], 2)
        ).transpose(1, 2)
        errors[policy] = (out - exact).abs().max().item()
    assert errors["a2"] < errors["position"]
