"""The fixed-capacity cache: the same codes and tokens as the growing one, exact memory, a clear
error past its capacity, generate's cache operations, and a compiled decode step that matches eager."""

from __future__ import annotations

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig, enable_headq_attention
from transformers_headq.config import cache_bytes_per_head
from transformers_headq.static import StaticHeadQLayer
from transformers_headq.store import CacheCapacityError

from .helpers import prefill_then_decode, random_basis, tiny_model

CONFIGS = {
    "k-only side code": HeadQConfig(key_bits=2, block_size=4, side_bits=3, side_scale="block", meta_dtype="float32"),
    "full-kv token scales": HeadQConfig(key_bits=2, value_bits=2, block_size=4, side_bits=4, side_scale="token"),
    "dense side code": HeadQConfig(key_bits=3, value_bits=2, block_size=8, side_bits=None),
    "plain 2-bit": HeadQConfig(key_bits=2, value_bits=2, block_size=4, rank=0),
    "sink keys": HeadQConfig(key_bits=2, value_bits=2, block_size=4, side_bits=3, side_scale="block", sink_keys=2),
}


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _cache(model, config: HeadQConfig, max_cache_len: int | None) -> HeadQCache:
    basis = None if config.rank == 0 else random_basis(model, rank=4)
    return HeadQCache(basis, config, model_config=model.config, max_cache_len=max_cache_len)


def _stored(cache: HeadQCache) -> list[torch.Tensor]:
    """Every stored code, scale and zero of every filled layer (used rows only)."""
    out = []
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        layer.quantized_length  # noqa: B018 (a fixed layer syncs its host lengths here)
        for store in (layer.key_store, layer.side_store, layer.value_store):
            if store is not None:
                out += [buf.data for buf in store.buffers()]
    return out


def _storages(cache: HeadQCache) -> list[torch.Tensor]:
    """Every allocated buffer of every layer's stores, used rows or not."""
    stores = [s for layer in cache.layers for s in (layer.key_store, layer.side_store, layer.value_store)]
    return [buf.storage for s in stores if s is not None for buf in s.buffers()]


@pytest.mark.core
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fixed_capacity_stores_the_same_codes_as_the_growing_cache(name):
    """The same states in, in a prefill and then one at a time: the same bits stored."""
    model = tiny_model()
    growing, fixed = _cache(model, CONFIGS[name], None), _cache(model, CONFIGS[name], 40)
    states = torch.randn(2, 2, 2, 23, 16, generator=torch.Generator().manual_seed(1))
    for cache in (growing, fixed):
        cache.update(states[0, :, :, :7], states[1, :, :, :7], 0)
        for t in range(7, 23):
            cache.update(states[0, :, :, t : t + 1], states[1, :, :, t : t + 1], 0)
    assert fixed.layers[0].get_seq_length() == growing.layers[0].get_seq_length() == 23
    stored = [_stored(c) for c in (fixed, growing)]  # layer 0's: the only one filled
    assert len(stored[0]) == len(stored[1]) > 0
    for a, b in zip(*stored, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(fixed.layers[0].effective_keys(), growing.layers[0].effective_keys(), atol=0, rtol=0)


@pytest.mark.core
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fixed_capacity_gives_the_same_logits(name):
    """Through a model: decode attention over the whole capacity sums in another order than the
    reference path's chunks, so logits agree to float rounding. One layer: a second layer would get
    states that differ by that rounding (~1e-7), and a 2-bit code on a rounding boundary can then flip
    (1e-4 in its keys); the test above gives both caches the same states instead."""
    model = tiny_model(layers=1)
    enable_headq_attention(model)
    ids = _ids(2, 23)
    growing, fixed = _cache(model, CONFIGS[name], None), _cache(model, CONFIGS[name], 40)
    expected = prefill_then_decode(model, growing, ids, prefill=7)
    got = prefill_then_decode(model, fixed, ids, prefill=7)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert fixed.get_seq_length() == growing.get_seq_length() == 23
    assert all(isinstance(layer, StaticHeadQLayer) for layer in fixed.layers) and fixed.is_compileable


@pytest.mark.core
def test_generate_with_left_padding_gives_the_same_tokens():
    model = tiny_model("qwen2")
    enable_headq_attention(model)
    ids = _ids(2, 9, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # the first prompt is 3 tokens shorter: left padding
    config = CONFIGS["full-kv token scales"]
    kwargs = {"attention_mask": mask, "max_new_tokens": 20, "do_sample": False}
    growing = model.generate(ids, past_key_values=_cache(model, config, None), **kwargs)
    fixed = model.generate(ids, past_key_values=_cache(model, config, 9 + 20), **kwargs)
    assert torch.equal(fixed, growing)


def test_memory_is_allocated_once_and_is_what_the_accounting_says():
    model = tiny_model()
    enable_headq_attention(model)
    config = CONFIGS["full-kv token scales"]
    cache = _cache(model, config, 30)  # rounded up to 32 tokens: 8 blocks of 4
    with torch.no_grad():
        model(input_ids=_ids(3, 5), past_key_values=cache)
    layer = cache.layers[0]
    allocated = cache.allocated_bytes()
    heads, head_dim = layer.shape[1], layer.shape[2]
    key, value = cache_bytes_per_head(config, head_dim, layer.rank, 32, torch.float32)  # with the sink key
    assert config.sink_keys == 1
    window = 2 * 4 * head_dim * 4  # a one-block window of keys and values, float32
    sink_row_values = head_dim * 4  # the sink key's row of the window buffer: its value half is not used
    # quantized, fill and the overflow flag, then the CUDA kernel's counters (an int64 a sequence and head: 3 x 2)
    counters = (3 + 6) * 8
    assert allocated == len(cache.layers) * (3 * heads * (key + value + window + sink_row_values) + counters)
    with torch.no_grad():
        for t in range(5, 32):
            model(input_ids=_ids(3, 1, seed=t), past_key_values=cache)
    assert cache.allocated_bytes() == allocated and cache.get_seq_length() == 32


def test_past_the_capacity_is_a_clear_error_never_an_overwrite():
    model = tiny_model()
    enable_headq_attention(model)
    config = CONFIGS["k-only side code"]
    with pytest.raises(CacheCapacityError, match="max_cache_len >= prompt length \\+ max_new_tokens"), torch.no_grad():
        model(input_ids=_ids(1, 13), past_key_values=_cache(model, config, 12))
    cache = _cache(model, config, 12)
    with torch.no_grad():
        model(input_ids=_ids(1, 12), past_key_values=cache)  # full: 12 quantized tokens
        before = [t.clone() for t in _storages(cache)]
        # The 13th token is taken on the device (a compiled step cannot raise) and flagged; the next
        # eager call raises. Its block would go nowhere: the stored blocks stay as they were.
        with pytest.raises(CacheCapacityError, match="made for 12 tokens .* but needs 13"):
            for t in range(4):
                model(input_ids=_ids(1, 1, seed=t), past_key_values=cache)
        assert t == 1
    assert all(torch.equal(a, b) for a, b in zip(_storages(cache), before, strict=True))  # nothing written over


def test_beam_search_crop_and_reset_with_fixed_capacity():
    model = tiny_model()
    enable_headq_attention(model)
    config = CONFIGS["full-kv token scales"]
    ids = _ids(1, 6, seed=4)
    kwargs = {"max_new_tokens": 10, "num_beams": 3, "do_sample": False}
    growing = model.generate(ids, past_key_values=_cache(model, config, None), **kwargs)
    fixed = model.generate(ids, past_key_values=_cache(model, config, 16), **kwargs)
    assert torch.equal(fixed, growing)

    for cut in (1, 6):  # within the window, then into a quantized block
        caches = [_cache(model, config, None), _cache(model, config, 24)]
        logits = []
        for cache in caches:
            with torch.no_grad():
                model(input_ids=_ids(2, 14), past_key_values=cache)
                cache.crop(-cut)
                logits.append(model(input_ids=_ids(2, 1, seed=9), past_key_values=cache).logits)
        assert caches[1].get_seq_length() == 14 - cut + 1
        torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    cache = caches[1]
    storage = cache.layers[0].key_store.buffers()[0].storage
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.layers[0].key_store.buffers()[0].storage is storage


def _fresh_compile_caches() -> None:
    """Compile each test's settings from scratch, as a new process would. Without this, the second settings
    recompile the shared code with their integers made symbolic (dynamo's automatic dynamic shapes), and
    torch 2.11 then fails on ``1 << bits`` in the unpacking (torch 2.13 does not)."""
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full-kv token scales", "sink keys"])
def test_compiled_decode_step_matches_eager(name):
    """torch.compile(fullgraph=True) captures a whole decode step with HeadQ in it (inductor on CPU), block 0
    committed (and with sink keys, its sink rows written) inside a compiled step. The compiled model's
    projections round differently from eager ones (states differ by ~1e-7), so a scale may differ by an
    ulp: stored bits are compared in the test below, where both caches get the same states."""
    _fresh_compile_caches()
    model = tiny_model()
    enable_headq_attention(model)
    config = CONFIGS[name]
    ids = _ids(2, 17)
    eager_cache, compiled_cache = _cache(model, config, 24), _cache(model, config, 24)
    eager = prefill_then_decode(model, eager_cache, ids, prefill=3)  # block 0 is stored by a decode step
    compiled_forward = torch.compile(model.forward, fullgraph=True)
    compiled = prefill_then_decode(model, compiled_cache, ids, prefill=3, forward=compiled_forward)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full-kv token scales", "sink keys"])
def test_compiled_cache_update_stores_what_eager_stores(name):
    """The same states, one token at a time, through a compiled and an eager decode update: the same bits."""
    _fresh_compile_caches()
    model = tiny_model()
    config = CONFIGS[name]
    states = torch.randn(2, 2, 2, 21, 16, generator=torch.Generator().manual_seed(4))
    eager_cache, compiled_cache = _cache(model, config, 24), _cache(model, config, 24)

    def step(cache: HeadQCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        cache.update(keys, values, 0)

    compiled_step = torch.compile(step, fullgraph=True)
    for cache, run in ((eager_cache, step), (compiled_cache, compiled_step)):
        cache.update(states[0, :, :, :3], states[1, :, :, :3], 0)  # the prefill runs eagerly
        for t in range(3, 21):
            run(cache, states[0, :, :, t : t + 1], states[1, :, :, t : t + 1])
    assert compiled_cache.get_seq_length() == eager_cache.get_seq_length() == 21
    stored = [_stored(c) for c in (compiled_cache, eager_cache)]
    assert len(stored[0]) == len(stored[1]) > 0
    for a, b in zip(*stored, strict=True):
        assert torch.equal(a, b)
    layers = compiled_cache.layers[0], eager_cache.layers[0]
    torch.testing.assert_close(layers[0].window, layers[1].window, atol=0, rtol=0)  # window and sink rows


@pytest.mark.slow
def test_the_e2e_records_check_feeds_eager_tokens_to_the_compiled_decode(monkeypatch):
    """``benchmarks/decode_e2e.py --check-tokens`` (the GPU record's compiled-against-eager check) on CPU: compiled
    HeadQ, fed eager HeadQ's greedy tokens of a left-padded batch, agrees at every step (on the float32 tiny model
    inductor's logits are eager's to rounding, as the StaticCache control's are); a token that differs is counted
    at its step."""
    import os

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    from decode_e2e import agreement, check_tokens, logit_error

    from transformers_headq import HeadQCacheFactory

    _fresh_compile_caches()
    model = tiny_model()
    factory = HeadQCacheFactory.from_pretrained(random_basis(model, 4), model, **CONFIGS["sink keys"].to_dict())
    found = check_tokens(model, factory, new_tokens=10, prompt_len=16)
    for check in found, found["control"]:  # HeadQ, then the StaticCache control; float32: rounding apart
        assert check["same_tokens"] and check["first_difference"] is None and check["argmax_agreement"] == 1.0
        assert 0 <= check["logit_relative_error_max"] < 1e-5 and check["top2_gap_median"] > 0
    again = found["headq_eager_again"]  # the CPU path sums in one order
    assert again["same_tokens"] and again["logit_relative_error_max"] == 0.0
    to_full = found["headq_eager_vs_bf16"], found["headq_compiled_vs_bf16"]  # HeadQ's own error, compiled or not
    assert to_full[0]["logit_relative_error_max"] > 1e-3
    assert to_full[1]["logit_relative_error_max"] == pytest.approx(to_full[0]["logit_relative_error_max"], rel=1e-4)
    reference = torch.tensor([[1, 2, 3], [4, 5, 6]])
    flipped = reference.clone()
    flipped[1, 1] = 0
    assert agreement(flipped, reference) == {"same_tokens": False, "first_difference": 1, "argmax_agreement": 5 / 6}
    logits = torch.tensor([[[3.0, 1.0, 0.0]], [[0.0, 4.0, 0.0]]])
    error = logit_error(logits + torch.tensor([0.0, 0.0, 0.5]), logits)
    assert error["logit_relative_error_max"] == pytest.approx(0.5 / 10**0.5)  # norms 10**0.5 and 4
    assert error["logit_max_abs_error_median"] == 0.5 and error["top2_gap_median"] == 2.0  # gaps 2 and 4
    assert error["logit_relative_error_by_step"] == [round(0.5 / 10**0.5, 5)]  # one step: the batch's largest
