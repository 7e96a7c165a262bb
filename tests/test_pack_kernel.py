"""The quantize-and-pack kernel stores exactly what the torch quantizer stores.

Codes, scales and zero points must be bit-identical (the cache's contents must not depend on the
device): run under Triton's interpreter without a GPU, compiled on the device with one.
"""

from __future__ import annotations

import pytest
import torch

from transformers_headq.kernels import group_quantize, pack_supports
from transformers_headq.quantize import GroupQuantizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _states(channels: int, tokens: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, tokens, channels, generator=gen) * torch.linspace(0.1, 4.0, channels)
    x[0, 0] = torch.randint(-6, 7, (tokens, channels), generator=gen) / 2  # a grid: ties between codes
    x[1, 2, :, 0] = 0.75  # a constant channel: zero scale
    return x.to(DEVICE, dtype)


@pytest.mark.parametrize("meta", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(
    ("grouping", "group", "channels"),
    [("channel", 16, 64), ("channel", 64, 128), ("channel", 32, 20), ("token", 64, 64), ("token", 12, 12)],
)
def test_kernel_matches_torch_quantizer(grouping, group, channels, bits, meta):
    quantizer = GroupQuantizer(bits, grouping, group, meta)
    for dtype in (torch.float32, torch.bfloat16):
        x = _states(channels, tokens=128, dtype=dtype, seed=bits + channels)
        assert pack_supports(quantizer, x.shape)
        fast, oracle = group_quantize(quantizer, x), quantizer.quantize(x)
        assert torch.equal(fast.codes, oracle.codes)
        assert torch.equal(fast.scale, oracle.scale) and torch.equal(fast.zero, oracle.zero)


def test_uncovered_quantizers():
    x = torch.zeros(1, 1, 64, 16)
    assert not pack_supports(GroupQuantizer(3, "channel", 16), x.shape)  # 3-bit codes straddle bytes
    assert not pack_supports(GroupQuantizer(1, "channel", 16), x.shape)  # eight planes
    assert not pack_supports(GroupQuantizer(2, "channel", 24), x.shape)  # a block that is not a power of two
    assert not pack_supports(GroupQuantizer(2, "token", 8), x.shape)  # several scales a token
