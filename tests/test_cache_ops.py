"""Cache operations generate() relies on: crop, batch select/repeat, reorder, reset, dtypes."""

from __future__ import annotations

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig, enable_headq_attention

from .helpers import random_basis, tiny_model

CONFIG = HeadQConfig(key_bits=2, value_bits=2, block_size=4, side_bits=4)


def _filled(model, length=10, batch=3):
    cache = HeadQCache(random_basis(model, 4), CONFIG)
    ids = torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, past_key_values=cache)
    return cache


def test_crop_within_window_is_exact_and_into_a_block_keeps_next_logits():
    model = tiny_model()
    enable_headq_attention(model)
    ids = torch.randint(1, 97, (1, 14), generator=torch.Generator().manual_seed(1))
    nxt = torch.tensor([[5]])

    def after(prefix_len, crop):
        cache = HeadQCache(random_basis(model, 4), CONFIG)
        model(input_ids=ids[:, :prefix_len], past_key_values=cache)
        if crop:
            cache.crop(-crop)
        return cache, model(input_ids=nxt, past_key_values=cache).logits

    # 10 tokens: 8 quantized + 2 in the window; cropping 1 stays in the window.
    reference_cache, reference = after(9, 0)
    cropped_cache, cropped = after(10, 1)
    assert cropped_cache.get_seq_length() == reference_cache.get_seq_length() == 10
    torch.testing.assert_close(cropped, reference, atol=1e-5, rtol=0)

    # 14 tokens: cropping 5 reaches into the last quantized block; the logits for the kept
    # tokens are those attention saw before the crop.
    cache = HeadQCache(random_basis(model, 4), CONFIG)
    model(input_ids=ids, past_key_values=cache)
    before = cache.layers[0].effective_keys()[:, :, :9]
    cache.crop(-5)
    assert cache.get_seq_length() == 9
    torch.testing.assert_close(cache.layers[0].effective_keys(), before)
    cache.crop(3)  # legacy form: the length to keep
    assert cache.get_seq_length() == 3


def test_batch_select_repeat_reorder_and_reset():
    model = tiny_model()
    enable_headq_attention(model)
    cache = _filled(model)
    keys = cache.layers[1].effective_keys()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.layers[1].effective_keys(), keys[[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert torch.equal(cache.layers[1].effective_keys(), keys[[2, 1]])
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.layers[1].effective_keys(), keys[[2, 2, 1, 1]])
    assert cache.get_mask_sizes(3, 0) == (13, 0)
    model(input_ids=torch.ones(4, 1, dtype=torch.long), past_key_values=cache)
    assert cache.get_seq_length() == 11
    cache.reset()
    assert cache.get_seq_length() == 0
    model(input_ids=torch.ones(1, 2, dtype=torch.long), past_key_values=cache)
    assert cache.get_seq_length() == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_generate(dtype):
    model = tiny_model(dtype=dtype)
    enable_headq_attention(model)
    cache = HeadQCache(random_basis(model, 4), CONFIG)
    out = model.generate(
        input_ids=torch.ones(2, 9, dtype=torch.long), max_new_tokens=6, do_sample=False, past_key_values=cache
    )
    assert out.shape == (2, 15)
    assert cache.layers[0].effective_keys().dtype == dtype


def test_assisted_generation_runs_with_crop():
    model = tiny_model()
    assistant = tiny_model(seed=3)
    enable_headq_attention(model)
    ids = torch.randint(1, 97, (1, 11), generator=torch.Generator().manual_seed(2))
    out = model.generate(
        input_ids=ids,
        assistant_model=assistant,
        max_new_tokens=8,
        do_sample=False,
        past_key_values=HeadQCache(random_basis(model, 4), CONFIG),
    )
    assert out.shape[1] == 19
