"""Query-aware per-channel key widths (``mixed_key_bits``): allocation, storage, equivalences, accounting."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig, QueryBasis, enable_headq_attention
from transformers_headq.calibrate import ChannelRanges, calibrate
from transformers_headq.config import bits_per_element
from transformers_headq.errors import CacheInputError
from transformers_headq.mixed_keys import (
    KEY_WIDTHS,
    MixedKeyQuantizer,
    allocate_key_widths,
    stored_code_bits,
)
from transformers_headq.quantize import GroupQuantizer

from .helpers import prefill_then_decode, random_basis, tiny_model

pytestmark = pytest.mark.core

BLOCK = 4


def _weights(layers: int = 3, heads: int = 2, dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(heads, dim, generator=gen) ** 4 for _ in range(layers)]


def _with_weights(basis: QueryBasis, weights: list[torch.Tensor]) -> QueryBasis:
    layers = [dataclasses.replace(layer, key_channel_weight=w) for layer, w in zip(basis.layers, weights, strict=True)]
    return dataclasses.replace(basis, layers=layers)


@pytest.mark.parametrize("mean", [1.0, 1.5, 2.0, 2.5, 3.0, 3.75, 4.0])
def test_allocation_spends_at_most_the_mean_and_favours_heavy_channels(mean):
    weights = _weights(layers=4, heads=2, dim=32)
    widths = allocate_key_widths(weights, mean)
    total = sum(int(w.sum()) for w in widths)
    channels = sum(w.numel() for w in widths)
    assert total <= mean * channels
    # demotions to whole bytes give back at most 7 channels' bit per width and layer
    assert total >= mean * channels - 3 * 7 * len(widths) - 1
    for w, weight in zip(widths, weights, strict=True):
        assert set(w.unique().tolist()) <= set(KEY_WIDTHS)
        for bits in (2, 3, 4):  # rows of 2-4 bits fill whole bytes: no padding
            assert int((w == bits).sum()) * bits % 8 == 0
        # within a layer a heavier channel never gets fewer bits (demotions take the lightest of a width)
        by_weight = w.flatten()[torch.argsort(weight.flatten())]
        assert bool((by_weight[1:] >= by_weight[:-1]).all())
    # across layers the heaviest channels get the most bits
    flat_w, flat_b = torch.cat([w.flatten() for w in weights]), torch.cat([w.flatten() for w in widths])
    if mean < 4:
        assert flat_b[flat_w.argmax()] >= flat_b[flat_w.argmin()]


def test_allocation_errors_are_clear():
    with pytest.raises(ValueError, match="between 1 and 4"):
        allocate_key_widths(_weights(), 4.5)
    with pytest.raises(ValueError, match="non-negative"):
        allocate_key_widths([-torch.ones(2, 16)], 2.0)


def test_stored_code_bits_count_padding_of_one_bit_rows():
    widths = [torch.tensor([[1, 1, 1, 2, 2, 2, 2, 4]])]  # 3 one-bit codes take a byte
    assert stored_code_bits(widths) == pytest.approx((8 + 8 + 8) / 8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_one_width_everywhere_is_the_uniform_quantizer_bit_for_bit(bits):
    keys = torch.randn(2, 3, 2 * BLOCK, 8, generator=torch.Generator().manual_seed(1))
    mixed = MixedKeyQuantizer(torch.full((3, 8), bits), BLOCK, torch.float16)
    uniform = GroupQuantizer(bits, "channel", BLOCK, torch.float16)
    expected = uniform.dequantize(uniform.quantize(keys), 8, torch.float32)
    torch.testing.assert_close(mixed.dequantize(mixed.quantize(keys), torch.float32), expected, atol=0, rtol=0)


def test_mixed_widths_put_each_channel_through_its_own_width():
    keys = torch.randn(1, 2, BLOCK, 4, generator=torch.Generator().manual_seed(2))
    widths = torch.tensor([[1, 4, 2, 3], [3, 3, 1, 4]])
    mixed = MixedKeyQuantizer(widths, BLOCK, torch.float16)
    out = mixed.dequantize(mixed.quantize(keys), torch.float32)
    for h in range(2):
        for c in range(4):
            q = GroupQuantizer(int(widths[h, c]), "channel", BLOCK, torch.float16)
            x = keys[:, h : h + 1, :, c : c + 1]
            torch.testing.assert_close(out[:, h : h + 1, :, c : c + 1], q.dequantize(q.quantize(x), 1, torch.float32))


@pytest.mark.parametrize("rank", [0, 4])
def test_equal_weights_at_whole_bits_reproduce_the_uniform_cache_exactly(rank):
    """Equal channel weights and a whole mean give every channel that width: the same logits as key_bits."""
    model = tiny_model()
    enable_headq_attention(model)
    basis = random_basis(model, 4)
    basis = _with_weights(basis, [torch.ones(2, 16) for _ in basis.layers])
    config = HeadQConfig(key_bits=2, block_size=BLOCK, rank=rank, side_bits=3, side_scale="block")
    ids = torch.randint(1, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    uniform = prefill_then_decode(model, HeadQCache(basis, config), ids, 9)
    mixed = prefill_then_decode(model, HeadQCache(basis, config.replace(mixed_key_bits=2.0)), ids, 9)
    torch.testing.assert_close(mixed, uniform, atol=0, rtol=0)


def test_mixed_cache_prefill_matches_token_by_token_decode_and_counts_its_bytes():
    model = tiny_model()
    enable_headq_attention(model)
    basis = _with_weights(random_basis(model, 4), _weights(layers=2, heads=2, dim=16))
    config = HeadQConfig(key_bits=2, block_size=BLOCK, rank=4, side_bits=3, side_scale="block", mixed_key_bits=2.5)
    ids = torch.randint(1, 97, (2, 18), generator=torch.Generator().manual_seed(3))
    one_forward = HeadQCache(basis, config)
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=one_forward).logits
    stepped = prefill_then_decode(model, HeadQCache(basis, config), ids, 1)
    torch.testing.assert_close(stepped, logits, atol=2e-5, rtol=2e-5)
    widths = one_forward.key_widths
    assert widths is not None and len({int(w.max()) for w in widths} | {int(w.min()) for w in widths}) > 1
    code_bits = one_forward.key_code_bits()
    expected = bits_per_element(config, 16, 4, ids.shape[1], torch.float32, code_bits)
    assert one_forward.measured_bits_per_element().key == pytest.approx(expected.key)


def test_mixed_cache_crops_and_regrows_like_a_fresh_one():
    model = tiny_model()
    enable_headq_attention(model)
    basis = _with_weights(random_basis(model, 4), _weights(layers=2, heads=2, dim=16))
    config = HeadQConfig(key_bits=2, block_size=BLOCK, rank=0, mixed_key_bits=3.0)
    ids = torch.randint(1, 97, (1, 14), generator=torch.Generator().manual_seed(4))
    cropped, fresh = HeadQCache(basis, config), HeadQCache(basis, config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cropped)
        cropped.crop(8)
        again = model(input_ids=ids[:, 8:], past_key_values=cropped).logits
        model(input_ids=ids[:, :8], past_key_values=fresh)
        held = [layer.key_store.read(0, 8, torch.float32) for layer in cropped.layers]
        expected = model(input_ids=ids[:, 8:], past_key_values=fresh).logits
    for layer, keys in zip(fresh.layers, held, strict=True):  # the same codes as a cache that never held more
        torch.testing.assert_close(layer.key_store.read(0, 8, torch.float32), keys, atol=0, rtol=0)
    # the logits only up to float rounding: a uniform cache differs by ~6e-8 here too (another chunking)
    torch.testing.assert_close(again, expected, atol=1e-5, rtol=0)


def test_mixed_settings_are_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="channel-grouped"):
        HeadQConfig(key_grouping="token", mixed_key_bits=2.0)
    with pytest.raises(ValueError, match="between 1 and 4"):
        HeadQConfig(mixed_key_bits=5.0)
    with pytest.raises(CacheInputError, match="key channel weights"):
        HeadQCache(random_basis(model, 4), HeadQConfig(mixed_key_bits=2.0))
    weighted = _with_weights(random_basis(model, 4), _weights(layers=2, heads=2, dim=16))
    with pytest.raises(CacheInputError, match="fixed-capacity"):
        HeadQCache(weighted, HeadQConfig(mixed_key_bits=2.0), max_cache_len=32)


def test_channel_weights_survive_a_round_trip_and_tensor_parallel_slicing(tmp_path):
    model = tiny_model()
    weights = _weights(layers=2, heads=2, dim=16)
    basis = _with_weights(random_basis(model, 4), weights)
    loaded = QueryBasis.from_pretrained(basis.save_pretrained(tmp_path / "b"))
    for layer, w in zip(loaded.layers, weights, strict=True):
        torch.testing.assert_close(layer.key_channel_weight, w)
    half = loaded.for_kv_heads(slice(1, 2))
    torch.testing.assert_close(half.layers[0].key_channel_weight, weights[0][1:2])


def test_channel_ranges_are_the_mean_square_range_over_whole_blocks():
    keys = torch.arange(2 * 1 * 10 * 2, dtype=torch.float32).reshape(2, 1, 10, 2)  # 2 whole blocks of 4, 2 left
    keys[..., 1] *= 3
    ranges = ChannelRanges(1, 2, BLOCK)
    ranges.add(keys)
    mean_square = ranges.mean_square()
    assert mean_square is not None
    # consecutive tokens differ by 2 in channel 0 (rows of 2 channels): range 6 per block; channel 1 three times
    torch.testing.assert_close(mean_square, torch.tensor([[36.0, 324.0]], dtype=torch.float64))


def test_calibration_writes_channel_weights_from_queries_and_key_ranges():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    quantizer = HeadQConfig(block_size=BLOCK).key_quantizer(16)
    bases = calibrate(model, [ids], rank=4, key_quantizer=quantizer)
    for kind in ("query", "oblique"):
        for layer in bases[kind].layers:
            assert layer.key_channel_weight is not None and layer.key_channel_weight.shape == (2, 16)
            assert bool((layer.key_channel_weight > 0).all())
