"""One forward over a sequence equals a true token-by-token decode through HeadQCache.

Tolerances, and why:
- Attention level, identical key/value/query tensors fed both ways: 1e-6. Same codes, same
  metadata; only the order of float32 sums differs.
- Model level: 1e-5 on float32 log-likelihoods with float32 scales. The projections of a
  1-token and a 37-token forward differ by ~1e-7 (matmul shapes), which is all that reaches
  the log-likelihoods (~5e-7 measured). With the default float16 scales the same 1e-7 can cross
  a float16 rounding boundary of a scale or zero point (one ulp ≈ 5e-4 relative), which moves
  log-likelihoods by up to ~5e-5; that case is checked at 2e-4.
"""

from __future__ import annotations

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig, enable_headq_attention, headq_attention_forward

from .helpers import random_basis, random_orthonormal, tiny_model
from .test_attention import MODULE, _basis

pytestmark = pytest.mark.core

CONFIGS = {
    "kivi-k2-headq": HeadQConfig(key_bits=2, key_grouping="channel", block_size=8, side_bits=4),
    "token-k2-v2-headq": HeadQConfig(key_bits=2, key_grouping="token", value_bits=2, block_size=1, side_bits=2),
    "kivi-kv2-block-side": HeadQConfig(key_bits=2, value_bits=2, block_size=5, side_bits=3, side_scale="block"),
    "kivi-kv2-a2": HeadQConfig(key_bits=2, value_bits=2, block_size=5, side_bits=3, side_scale="block", value_keep=2),
    "kivi-kv2-sinks": HeadQConfig(key_bits=2, value_bits=2, block_size=5, side_bits=3, side_scale="block", sink_keys=2),
    "kivi-kv2-position-keep": HeadQConfig(
        key_bits=2, value_bits=2, block_size=8, value_keep=1, value_policy="position"
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_attention_one_call_equals_token_by_token(name):
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 23, 8, generator=gen), torch.randn(2, 2, 23, 8, generator=gen)
    queries = torch.randn(2, 4, 23, 8, generator=gen)
    basis = _basis(random_orthonormal(2, 8, 3))
    cache = HeadQCache(basis, CONFIGS[name])
    k, v = cache.update(keys, values, 0)
    one_call, _ = headq_attention_forward(MODULE, queries, k, v, None)
    cache = HeadQCache(basis, CONFIGS[name])
    steps = []
    for t in range(23):
        k, v = cache.update(keys[:, :, t : t + 1], values[:, :, t : t + 1], 0)
        steps.append(headq_attention_forward(MODULE, queries[:, :, t : t + 1], k, v, None)[0])
    torch.testing.assert_close(one_call, torch.cat(steps, 1), atol=1e-6, rtol=0)


def _token_log_likelihoods(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("meta_dtype,atol", [("float32", 1e-5), ("float16", 2e-4)])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_one_forward_equals_token_by_token_decode(name, meta_dtype, atol):
    model = tiny_model()
    enable_headq_attention(model)
    basis = random_basis(model, rank=4)
    config = CONFIGS[name].replace(meta_dtype=meta_dtype)
    ids = torch.randint(1, 97, (2, 37), generator=torch.Generator().manual_seed(0))

    one_cache = HeadQCache(basis, config)
    one_forward = model(input_ids=ids, past_key_values=one_cache).logits
    step_cache = HeadQCache(basis, config)
    decoded = torch.cat([model(input_ids=ids[:, t : t + 1], past_key_values=step_cache).logits for t in range(37)], 1)
    chunk_cache = HeadQCache(basis, config)
    chunked = torch.cat([model(input_ids=p, past_key_values=chunk_cache).logits for p in ids.split([13, 3, 21], 1)], 1)

    reference = _token_log_likelihoods(decoded, ids)
    torch.testing.assert_close(_token_log_likelihoods(one_forward, ids), reference, atol=atol, rtol=0)
    torch.testing.assert_close(_token_log_likelihoods(chunked, ids), reference, atol=atol, rtol=0)
    assert one_cache.get_seq_length() == step_cache.get_seq_length() == chunk_cache.get_seq_length() == 37
