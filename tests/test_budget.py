"""Reported memory equals the bytes the tensors hold; bits per element match it exactly."""

from __future__ import annotations

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig, bits_per_element, enable_headq_attention
from transformers_headq.store import TokenBuffer

from .helpers import random_basis, tiny_model

CONFIGS = [
    HeadQConfig(key_bits=2, key_grouping="channel", block_size=8, side_bits=4, side_scale="token"),
    HeadQConfig(key_bits=2, key_grouping="token", channel_group=8, block_size=1, side_bits=2),
    HeadQConfig(key_bits=3, value_bits=2, block_size=4, side_bits=8, side_scale="block"),
    HeadQConfig(key_bits=2, value_bits=4, block_size=8, side_bits=None, track_attention=True),
    HeadQConfig(key_bits=None, value_bits=None, rank=0, block_size=8),
    HeadQConfig(key_bits=2, value_bits=2, block_size=4, side_bits=4, value_keep=2),
    HeadQConfig(key_bits=2, value_bits=2, block_size=4, side_bits=4, value_keep=1, value_policy="position"),
    HeadQConfig(key_bits=2, value_bits=2, block_size=8, side_bits=3, side_scale="block", sink_keys=3),
]


def _held_tensors(cache: HeadQCache) -> list[torch.Tensor]:
    """Every tensor a layer holds, found by walking its attributes (not via the cache's own counters)."""
    found = []
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                found.append(value)  # window keys / values
            stores = [value] if hasattr(value, "buffers") and callable(value.buffers) else []
            for store in stores:
                found += [buf.data for buf in store.buffers()]
            if isinstance(value, TokenBuffer):
                found.append(value.data)
    return found


@pytest.mark.parametrize(
    "config",
    CONFIGS,
    ids=lambda c: (
        f"k{c.key_bits}{c.key_grouping}-v{c.value_bits}-s{c.side_bits}-keep{c.value_keep}{c.value_policy}-sink{c.sink_keys}"
    ),
)
@pytest.mark.parametrize("length", [1, 7, 8, 29])
def test_memory_and_bits_match_held_bytes(config, length):
    model = tiny_model(dtype=torch.float16)
    rank = 0 if config.rank == 0 else 4
    basis = random_basis(model, 4) if rank else None
    cache = HeadQCache(basis, config, num_layers=2)
    enable_headq_attention(model)
    ids = torch.randint(1, 97, (2, length))
    model(input_ids=ids[:, : length // 2 + 1], past_key_values=cache)
    if length // 2 + 1 < length:
        model(input_ids=ids[:, length // 2 + 1 :], past_key_values=cache)

    tensors = _held_tensors(cache)
    used = sum(t.numel() * t.element_size() for t in tensors)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert cache.memory_bytes() == used
    assert cache.allocated_bytes() == sum(storages.values())
    measured = cache.measured_bits_per_element()
    predicted = bits_per_element(config, head_dim=16, rank=rank, seq_len=length, dtype=torch.float16)
    assert measured.key == pytest.approx(predicted.key, abs=1e-12)
    assert measured.value == pytest.approx(predicted.value, abs=1e-12)


def test_two_bit_keys_cost_what_the_layout_says():
    """2-bit codes at head dim 128, fp16 scale+zero per channel per 64-token block, 4-bit side code of
    rank 8 with one fp16 scale+zero per token: 2 + 2*16/64 + (8*4 + 32)/128 = 3.0 bits; the default exact sink
    key adds 16 bits of a key element over the 640 tokens: 0.025."""
    cfg = HeadQConfig(key_bits=2, key_grouping="channel", block_size=64, side_bits=4, side_scale="token")
    assert bits_per_element(cfg, head_dim=128, rank=8, seq_len=640).key == pytest.approx(3.025)
    assert bits_per_element(cfg.replace(sink_keys=0), head_dim=128, rank=8, seq_len=640).key == pytest.approx(3.0)
