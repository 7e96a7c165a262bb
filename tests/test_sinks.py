"""Exact sink keys: the first keys of a sequence are read exact, through every cache operation."""

from __future__ import annotations

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig, enable_headq_attention

from .helpers import prefill_then_decode, random_basis, tiny_model

pytestmark = pytest.mark.core

SINKS = 3
CONFIG = HeadQConfig(key_bits=2, value_bits=2, block_size=4, side_bits=3, side_scale="block", sink_keys=SINKS)


def _exact_keys(model, ids):
    """The first layer's keys as a DynamicCache holds them for ``ids`` (later layers' keys depend on how
    the cache changed attention in the layers before)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache)
    return cache.layers[0].keys


def test_sink_slots_read_exact_keys_and_the_rest_read_codes():
    model = tiny_model()
    enable_headq_attention(model)
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    exact = _exact_keys(model, ids)
    with_sinks = HeadQCache(random_basis(model, 4), CONFIG)
    without = HeadQCache(random_basis(model, 4), CONFIG.replace(sink_keys=0))
    model(input_ids=ids, past_key_values=with_sinks)
    model(input_ids=ids, past_key_values=without)
    read, plain = with_sinks.layers[0].effective_keys(), without.layers[0].effective_keys()
    torch.testing.assert_close(read[:, :, :SINKS], exact[:, :, :SINKS], atol=0, rtol=0)
    assert not torch.allclose(plain[:, :, :SINKS], exact[:, :, :SINKS])  # their codes do err
    torch.testing.assert_close(read[:, :, SINKS:], plain[:, :, SINKS:], atol=0, rtol=0)
    for layer in with_sinks.layers:  # every layer reads the keys it held when block 0 was quantized
        assert layer.sink_keys is not None
        torch.testing.assert_close(layer.effective_keys()[:, :, :SINKS], layer.sink_keys, atol=0, rtol=0)


def _prefilled(batch: int, length: int, seed: int):
    """A tiny model, a sink-key cache after one forward over random ids, the ids and the exact first-layer keys."""
    model = tiny_model()
    enable_headq_attention(model)
    ids = torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    cache = HeadQCache(random_basis(model, 4), CONFIG)
    model(input_ids=ids, past_key_values=cache)
    return model, cache, ids, _exact_keys(model, ids)


def test_sinks_follow_batch_operations_and_are_dropped_by_reset():
    model, cache, ids, exact = _prefilled(batch=3, length=10, seed=1)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    cache.batch_select_indices(torch.tensor([0, 2]))
    cache.batch_repeat_interleave(2)
    read = cache.layers[0].effective_keys()[:, :, :SINKS]
    torch.testing.assert_close(read, exact[[2, 2, 1, 1], :, :SINKS], atol=0, rtol=0)
    cache.reset()
    model(input_ids=ids[:1, :2], past_key_values=cache)
    assert cache.layers[0].sink_keys is None  # block 0 not quantized yet: the window holds them exact


def test_crop_into_the_first_block_and_regrow_keeps_sinks_exact():
    model, cache, ids, exact = _prefilled(batch=1, length=14, seed=2)
    cache.crop(2)  # block 0 goes back to the window, as attention saw it: exact sinks
    assert cache.layers[0].sink_keys is None and cache.get_seq_length() == 2
    model(input_ids=ids[:, 2:], past_key_values=cache)
    torch.testing.assert_close(cache.layers[0].effective_keys()[:, :, :2], exact[:, :, :2], atol=0, rtol=0)
    assert cache.layers[0].sink_keys is not None
    torch.testing.assert_close(cache.layers[0].sink_keys[:, :, :2], exact[:, :, :2], atol=0, rtol=0)


def test_sink_settings_are_checked():
    with pytest.raises(ValueError, match="sink_keys must be between 0 and block_size"):
        HeadQConfig(block_size=4, sink_keys=5)
    assert HeadQConfig().sink_keys == 1  # the default
    assert HeadQConfig(key_bits=None, sink_keys=4).sink_keys == 0  # dense keys are exact: nothing held twice


@pytest.mark.parametrize("prefill", [2, 9])  # block 0 committed by a decode step, or stored by the prefill
def test_fixed_capacity_cache_holds_the_same_sink_keys(prefill):
    """The fixed-capacity layer copies block 0's first keys into its sink rows on the device (a predicated
    write in the decode step) or in the prefill, reads them exact, and drops them with block 0 on a crop.
    One layer, so that both caches get the same states (see test_static's logits test)."""
    model = tiny_model(layers=1)
    enable_headq_attention(model)
    ids = torch.randint(1, 97, (2, 14), generator=torch.Generator().manual_seed(3))
    basis = random_basis(model, 4)
    caches = [HeadQCache(basis, CONFIG), HeadQCache(basis, CONFIG, max_cache_len=32, model_config=model.config)]
    logits = [prefill_then_decode(model, cache, ids, prefill) for cache in caches]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    growing, fixed = caches[0].layers[0], caches[1].layers[0]
    assert fixed.sink_keys is not None and growing.sink_keys is not None
    # The growing cache's sinks are the states it was given (test above); a decode step computes them in
    # another batch shape than one forward over all the ids would, so they are compared with those.
    torch.testing.assert_close(fixed.sink_keys, growing.sink_keys, atol=0, rtol=0)
    torch.testing.assert_close(fixed.effective_keys()[:, :, :SINKS], growing.sink_keys, atol=0, rtol=0)
    assert not torch.equal(fixed.sink_keys, torch.zeros_like(fixed.sink_keys))
    caches[1].crop(2)  # block 0 back in the window: its sink rows are no longer read
    assert fixed.sink_keys is None and caches[1].get_seq_length() == 2
