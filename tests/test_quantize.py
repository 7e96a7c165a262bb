"""Bit packing round-trips exactly; group quantizers stay within half a step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformers_headq.quantize import SUPPORTED_BITS, GroupQuantizer, pack_codes, packed_row_bytes, unpack_codes


@settings(max_examples=200, deadline=None)
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    n=st.integers(1, 67),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, lead, n, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (*lead, n), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_row_bytes(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_two_bit_codes_go_four_to_a_byte_in_planes():
    # 5 codes take 2 bytes; byte j holds codes j, j + 2, j + 4, j + 6 (padding) from its low bits up
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    packed = pack_codes(codes, 2)
    assert packed.tolist() == [[1 | 3 << 2 | 3 << 4, 2 | 0 << 2]]


def test_unpack_rejects_wrong_row_length():
    with pytest.raises(ValueError, match="need"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 2, 16)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("grouping,group", [("token", 8), ("token", 16), ("channel", 4)])
def test_quantizer_error_within_half_step(bits, grouping, group):
    x = torch.randn(2, 3, 8, 16) * 3 + 1
    q = GroupQuantizer(bits, grouping, group, torch.float32)
    packed = q.quantize(x)
    x_hat = q.dequantize(packed, 16, torch.float32)
    step = packed.scale.repeat_interleave(group, dim=-1 if grouping == "token" else -2)
    assert ((x_hat - x).abs() <= step / 2 + 1e-5).all()
    assert packed.codes.shape[-1] == packed_row_bytes(16, bits)


def test_constant_group_is_exact():
    x = torch.full((1, 1, 4, 8), 0.75)
    q = GroupQuantizer(2, "channel", 4)
    assert torch.equal(q.dequantize(q.quantize(x), 8, torch.float32), x)


def test_channel_grouping_needs_whole_blocks():
    with pytest.raises(ValueError, match="does not divide"):
        GroupQuantizer(2, "channel", 4).quantize(torch.randn(1, 1, 6, 8))


@pytest.mark.parametrize("bits", [0, 5, 16])
def test_unsupported_bits_are_refused(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        GroupQuantizer(bits, "token", 8)
