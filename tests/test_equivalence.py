"""Identity settings (no quantization, rank 0) must reproduce DynamicCache + sdpa exactly.

Every supported family, with prompts and generations longer than the tiny sliding windows (8
tokens), so sliding layers evict blocks while generating, as transformers' own cache does.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from transformers_headq import HeadQCache, HeadQConfig, enable_headq_attention

from .helpers import FAMILIES, tiny_model

pytestmark = pytest.mark.core

IDENTITY = HeadQConfig(key_bits=None, value_bits=None, rank=0, block_size=8)
# Versions 5.24+ name generate's cache argument `cache`; earlier ones `past_key_values`.
CACHE_KWARGS = ["past_key_values"] + (["cache"] if Version(transformers.__version__) >= Version("5.24") else [])


def _inputs(batch: int = 3, length: int = 21, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # left padding of different lengths
        mask[row, : 3 * row] = 0
        ids[row, : 3 * row] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _generate(model, cache, cache_kwarg, seed=0, **kwargs):
    torch.manual_seed(seed)
    return model.generate(
        **_inputs(),
        max_new_tokens=12,
        output_logits=True,
        return_dict_in_generate=True,
        **{cache_kwarg: cache},
        **kwargs,
    )


MODES = {
    "greedy": {"do_sample": False},
    "beam": {"do_sample": False, "num_beams": 3},
    "sample": {"do_sample": True, "top_k": 20, "temperature": 0.9},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("cache_kwarg", CACHE_KWARGS)
def test_identity_settings_reproduce_dynamic_cache(family, mode, cache_kwarg):
    model = tiny_model(family)
    reference = _generate(model, DynamicCache(config=model.config), cache_kwarg, **MODES[mode])
    enable_headq_attention(model)
    cache = HeadQCache(config=IDENTITY, model_config=model.config)
    ours = _generate(model, cache, cache_kwarg, **MODES[mode])
    if any(layer.is_sliding for layer in cache.layers):  # the window really slid: old blocks are gone
        assert all(layer.stored_length <= 8 + IDENTITY.block_size for layer in cache.layers if layer.is_sliding)
    assert torch.equal(reference.sequences, ours.sequences)
    for ref_step, our_step in zip(reference.logits, ours.logits, strict=True):
        torch.testing.assert_close(our_step, ref_step, atol=1e-5, rtol=0)


def test_forward_logits_match_over_prefill_and_decode(llama):
    """Prefill then single-token steps, logits at every position, padding included."""
    inputs = _inputs()
    ref_cache, our_cache = DynamicCache(), HeadQCache(config=IDENTITY, num_layers=2)
    ref = llama(**inputs, past_key_values=ref_cache).logits
    enable_headq_attention(llama)
    ours = llama(**inputs, past_key_values=our_cache).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=0)
    step = torch.randint(1, 97, (3, 1))
    mask = torch.cat([inputs["attention_mask"], torch.ones(3, 1, dtype=torch.long)], dim=1)
    llama.set_attn_implementation("sdpa")
    ref_next = llama(input_ids=step, attention_mask=mask, past_key_values=ref_cache).logits
    enable_headq_attention(llama)
    our_next = llama(input_ids=step, attention_mask=mask, past_key_values=our_cache).logits
    torch.testing.assert_close(our_next, ref_next, atol=1e-5, rtol=0)
    assert our_cache.get_seq_length() == ref_cache.get_seq_length() == 22


def test_lazy_states_still_work_with_sdpa(llama):
    """Another attention function gets dense effective keys from the hand-off view."""
    inputs = _inputs()
    ref = llama(**inputs, past_key_values=DynamicCache()).logits
    ours = llama(**inputs, past_key_values=HeadQCache(config=IDENTITY, num_layers=2)).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=0)
