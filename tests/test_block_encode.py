"""The block-encoding kernel stores what the torch path stores, and its predicated form writes a
block only where the flag says so.

Key and value codes, scales and zeros must be bit-identical to the torch quantizer. The side code is
a float32 product whose sums run in another order than torch's einsum (on a GPU, and under the
interpreter's numpy), so its scales may differ in the last bit and a few codes on a rounding boundary.
A GPU cache encodes every block through the kernel, so its eager and compiled contents agree
whatever the order (``tests/test_static.py`` on the GPU).
"""

from __future__ import annotations

import pytest
import torch

from transformers_headq.config import HeadQConfig
from transformers_headq.encode import _encode_torch
from transformers_headq.kernels import block_encode_supports, commit_block, encode_blocks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(heads: int, tokens: int, head_dim: int, rank: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, heads, tokens, head_dim, generator=gen) * torch.linspace(0.2, 5.0, head_dim)
    keys[0, 0, :, :4] = torch.randint(-6, 7, (tokens, 4), generator=gen) / 2  # grid values: ties
    values = torch.randn(2, heads, tokens, head_dim, generator=gen)
    values[1, 0, 3] = 0.5  # a constant token: zero scale
    q, _ = torch.linalg.qr(torch.randn(heads, head_dim, head_dim, generator=gen, dtype=torch.float64))
    encoder = q[..., :rank].float() if rank else None  # a slice of the basis: not contiguous
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return keys.to(DEVICE, dtype), values.to(DEVICE, dtype), move(encoder)


CASES = {
    # name: (config, head_dim, block)
    "K2 channel, r16 s4/block, V2": (HeadQConfig(rank=16, side_bits=4, side_scale="block", value_bits=2), 64, 32),
    "K2 channel, r8 s2/token, V4": (HeadQConfig(rank=8, side_bits=2, side_scale="token", value_bits=4), 64, 16),
    "K2 channel, r8 s4/block, dense V": (HeadQConfig(rank=8, side_bits=4, side_scale="block"), 32, 16),
    "K4 token, r16 dense side, V2": (
        HeadQConfig(key_bits=4, key_grouping="token", rank=16, side_bits=None, value_bits=2),
        64,
        32,
    ),
    "K2 channel, no side code, V2": (HeadQConfig(rank=0, value_bits=2), 128, 64),
}


def _quantizers(config: HeadQConfig, head_dim: int, block: int):
    config = config.replace(block_size=block)
    rank = config.rank or 0
    return config, (config.key_quantizer(head_dim), config.side_quantizer(rank), config.value_quantizer(head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_encodes_blocks_as_torch_does(case, dtype):
    config, head_dim, block = CASES[case]
    config, quantizers = _quantizers(config, head_dim, block)
    keys, values, encoder = _inputs(2, 3 * block, head_dim, config.rank or 0, dtype, seed=head_dim + block)
    assert block_encode_supports(quantizers, config.rank or 0, block, head_dim, dtype)
    fast = encode_blocks(keys, values, encoder, quantizers, block)
    oracle = _encode_torch(keys, values, encoder, quantizers)
    assert len(fast) == len(oracle)
    side = range(3, len(fast) - (3 if quantizers[2] is not None else 1)) if config.rank else range(0)
    for i, (a, b) in enumerate(zip(fast, oracle, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        if i in side:  # another summation order: a last-bit difference may move a scale or a boundary code
            if a.dtype == torch.uint8:
                assert (a != b).float().mean() < 0.02, i
            else:
                torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3)
        else:
            assert torch.equal(a, b), i


@pytest.mark.parametrize("case", ["K2 channel, r16 s4/block, V2", "K4 token, r16 dense side, V2"])
def test_predicated_commit_writes_one_block_only_when_flagged(case):
    config, head_dim, block = CASES[case]
    config, quantizers = _quantizers(config, head_dim, block)
    keys, values, encoder = _inputs(2, block, head_dim, config.rank or 0, torch.bfloat16, seed=7)
    encoded = encode_blocks(keys, values, encoder, quantizers, block)
    blocks = 4
    storage = [  # a fixed-capacity layer's tensors: 4 blocks of rows (or of metadata rows), filled with junk
        torch.full((*t.shape[:2], t.shape[2] * blocks, *t.shape[3:]), 7, dtype=t.dtype, device=DEVICE) for t in encoded
    ]
    before = [t.clone() for t in storage]
    target = torch.tensor([2], device=DEVICE)
    commit_block(keys, values, encoder, quantizers, storage, target, torch.tensor([False], device=DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(storage, before, strict=True))
    commit_block(keys, values, encoder, quantizers, storage, target, torch.tensor([True], device=DEVICE))
    for data, old, part in zip(storage, before, encoded, strict=True):
        rows = part.shape[2]
        assert torch.equal(data[:, :, 2 * rows : 3 * rows], part)
        rest = torch.ones(data.shape[2], dtype=torch.bool)
        rest[2 * rows : 3 * rows] = False
        assert torch.equal(data[:, :, rest], old[:, :, rest])


@pytest.mark.parametrize(
    ("changes", "block", "head_dim"),
    [
        ({"key_bits": 3}, 32, 64),  # 3-bit codes straddle bytes: no planes
        ({}, 8, 64),  # fewer tokens than a tensor-core product takes
        ({"value_bits": 2, "channel_group": 16}, 32, 64),  # value groups smaller than a token
        ({}, 32, 80),  # a head dim that is not a power of two
        ({"side_bits": 3}, 32, 64),
        ({"rank": 12}, 32, 64),  # 12 4-bit codes pack into 6 bytes: not a power of two
    ],
)
def test_settings_the_kernel_does_not_cover_are_refused(changes, block, head_dim):
    config, quantizers = _quantizers(HeadQConfig(**{"rank": 16, "side_bits": 4, **changes}), head_dim, block)
    assert not block_encode_supports(quantizers, config.rank or 0, block, head_dim, torch.bfloat16)
