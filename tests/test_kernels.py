"""The fused decode kernel computes what the torch reference path computes.

Without a GPU the Triton kernel runs under its interpreter (``TRITON_INTERPRET=1``, set by conftest;
exact float32 arithmetic): float32 caches match to float32 summation order, 1e-5. On a GPU the same
tests run the compiled kernel on the device (with its bit-trick code conversion); its float32 products
are emulated on tensor cores (``tf32x3``, about float32 precision): 1e-4. Half-precision caches round the
kernel's operands to 11 (float16) or 8 (bfloat16) significant bits: 2e-3 and 1e-2 relative.
"""

from __future__ import annotations

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig
from transformers_headq.attention import headq_attention_forward
from transformers_headq.fused_decode import kernel_covers

from .helpers import basis_from_tensors, random_orthonormal
from .test_attention import MODULE

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOAT32_TOLERANCE = 1e-4 if DEVICE.type == "cuda" else 1e-5

# name -> (settings, head dim): each packed plane must span at least 16 channels (a dot's depth)
CASES = {
    "k2-dense-values": (HeadQConfig(key_bits=2, block_size=16, rank=0), 64),
    "k2-r4s4-block-v2": (
        HeadQConfig(key_bits=2, value_bits=2, block_size=16, rank=4, side_bits=4, side_scale="block"),
        64,
    ),
    "k2-r8s2-token-v4": (
        HeadQConfig(key_bits=2, value_bits=4, block_size=16, rank=8, side_bits=2, side_scale="token"),
        64,
    ),
    "k4-r12s8-v8-fp32meta": (
        HeadQConfig(
            key_bits=4, value_bits=8, block_size=32, rank=12, side_bits=8, side_scale="block", meta_dtype="float32"
        ),
        128,
    ),
    "k2-r4s4-block-v2-sinks": (
        HeadQConfig(key_bits=2, value_bits=2, block_size=16, rank=4, side_bits=4, side_scale="block", sink_keys=3),
        64,
    ),
    "k8-r20s4-token-v2": (
        HeadQConfig(key_bits=8, value_bits=2, block_size=16, rank=20, side_bits=4, side_scale="token"),
        128,
    ),
}


def _filled_cache(
    config: HeadQConfig, tokens: int, seed: int, head_dim: int = 64, dtype: torch.dtype = torch.float32
) -> tuple[HeadQCache, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(3, 2, tokens, head_dim, generator=gen) * torch.linspace(0.2, 3, head_dim)  # channel outliers
    values = torch.randn(3, 2, tokens, head_dim, generator=gen)
    keys, values = keys.to(DEVICE, dtype), values.to(DEVICE, dtype)
    rank = config.rank or 0
    basis = basis_from_tensors_for(rank, seed, head_dim) if rank else None
    cache = HeadQCache(basis, config) if basis is not None else HeadQCache(config=config, num_layers=1)
    split = tokens - 5
    cache.update(keys[:, :, :split], values[:, :, :split], 0)
    for t in range(split, tokens):
        cache.update(keys[:, :, t : t + 1], values[:, :, t : t + 1], 0)
    return cache, torch.randn(3, 4, 1, head_dim, generator=gen).to(DEVICE, dtype)


def basis_from_tensors_for(rank: int, seed: int, head_dim: int, kv_heads: int = 2):
    class _Config:  # the fingerprint of a one-layer model with 2 query heads a KV head
        model_type, num_hidden_layers = "llama", 1

    _Config.head_dim, _Config.num_key_value_heads, _Config.num_attention_heads = head_dim, kv_heads, 2 * kv_heads
    return basis_from_tensors(
        type("M", (), {"config": _Config()})(), [random_orthonormal(kv_heads, head_dim, rank, seed)]
    )


@pytest.mark.parametrize("split_tokens", [16, 256])  # one quantization block a split (merged), or one split
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_decode_matches_reference(monkeypatch, name, padded, softcap, split_tokens):
    from transformers_headq import kernels
    from transformers_headq.fused_decode import fused_decode_attention

    monkeypatch.setitem(kernels.LAUNCH, "min_split_tokens", split_tokens)

    config, head_dim = CASES[name]
    cache, query = _filled_cache(config, tokens=71, seed=len(name), head_dim=head_dim)
    layer = cache.layers[0]
    mask = None
    if padded:  # left padding of 0, 9 and 40 tokens
        mask = torch.ones(3, 1, 1, layer.stored_length, dtype=torch.bool, device=DEVICE)
        mask[1, ..., :9] = False
        mask[2, ..., :40] = False
    key, value = cache.update(*torch.randn(2, 3, 2, 1, head_dim, device=DEVICE), 0)
    if mask is not None:
        mask = torch.cat([mask, torch.ones(3, 1, 1, 1, dtype=torch.bool, device=DEVICE)], dim=-1)
    fused = fused_decode_attention(layer, query, mask, 0.25, softcap)
    assert fused is not None, "the kernel should cover this layer"
    monkeypatch.setenv("HEADQ_KERNELS", "0")  # the torch reference path
    reference, _ = headq_attention_forward(MODULE, query, key, value, mask, scaling=0.25, softcap=softcap)
    assert fused.shape == reference.shape and fused.dtype == reference.dtype  # [B, 1, Hq, D], as attention returns
    torch.testing.assert_close(fused, reference, rtol=FLOAT32_TOLERANCE, atol=FLOAT32_TOLERANCE)


def test_fused_decode_sink_keys_spanning_tiles(monkeypatch):
    """20 sink keys: two of the kernel's 16-row sink tiles, and with loop tiles of 16 one tile wholly of sinks and
    one that mixes sinks (masked out of the loop) with coded slots; in the first split only (the others have none)."""
    from transformers_headq import kernels
    from transformers_headq.fused_decode import fused_decode_attention

    monkeypatch.setitem(kernels.LAUNCH, "tile", 16)
    monkeypatch.setitem(kernels.LAUNCH, "min_split_tokens", 32)
    monkeypatch.setitem(kernels.LAUNCH, "programs_per_sm", 1000)
    config = HeadQConfig(key_bits=2, value_bits=2, block_size=32, rank=4, side_bits=4, sink_keys=20)
    cache, query = _filled_cache(config, tokens=100, seed=3)
    layer = cache.layers[0]
    key, value = cache.update(*torch.randn(2, 3, 2, 1, 64, device=DEVICE), 0)
    fused = fused_decode_attention(layer, query, None, 0.25, None)
    assert fused is not None and layer.sink_keys is not None
    monkeypatch.setenv("HEADQ_KERNELS", "0")
    reference, _ = headq_attention_forward(MODULE, query, key, value, None, scaling=0.25)
    torch.testing.assert_close(fused, reference, rtol=FLOAT32_TOLERANCE, atol=FLOAT32_TOLERANCE)
    layer.sink_keys = None  # read from their codes, the same slots give another output: the check has teeth
    codes_only, _ = headq_attention_forward(MODULE, query, key, value, None, scaling=0.25)
    assert (codes_only - reference).abs().max() > 100 * FLOAT32_TOLERANCE


@pytest.mark.parametrize("tokens", [150, 221])  # 9 and 13 splits: the merge's chunks of 8, the last one partial
def test_fused_decode_merges_many_splits(monkeypatch, tokens):
    from transformers_headq import kernels
    from transformers_headq.fused_decode import fused_decode_attention

    monkeypatch.setitem(kernels.LAUNCH, "min_split_tokens", 16)  # one quantization block a split
    monkeypatch.setitem(kernels.LAUNCH, "programs_per_sm", 1000)  # as many splits as blocks, on any device
    config, head_dim = CASES["k2-r4s4-block-v2"]
    cache, query = _filled_cache(config, tokens=tokens, seed=tokens, head_dim=head_dim)
    layer = cache.layers[0]
    splits, _ = kernels._splits(3 * 2, layer.quantized_length, config.block_size, query.device)
    assert splits > 8 and splits % 8, splits
    key, value = cache.update(*torch.randn(2, 3, 2, 1, head_dim, device=DEVICE), 0)
    fused = fused_decode_attention(layer, query, None, 0.25, None)
    assert fused is not None
    monkeypatch.setenv("HEADQ_KERNELS", "0")
    reference, _ = headq_attention_forward(MODULE, query, key, value, None, scaling=0.25)
    torch.testing.assert_close(fused, reference, rtol=FLOAT32_TOLERANCE, atol=FLOAT32_TOLERANCE)


def test_uncovered_settings_fall_back():
    from transformers_headq.fused_decode import fused_decode_attention

    for config in (
        HeadQConfig(key_bits=3, block_size=16, rank=0),  # 3-bit codes straddle bytes
        HeadQConfig(key_bits=2, value_bits=2, block_size=16, rank=0, value_keep=1),  # A² kept values
        HeadQConfig(key_bits=2, key_grouping="token", block_size=16, rank=0),
        HeadQConfig(key_bits=1, block_size=16, rank=0),  # eight planes a byte: the kernel unrolls four
        # the kernel reads one value scale a token over the whole head (it read these layouts wrongly: NaN)
        HeadQConfig(key_bits=2, value_bits=2, value_grouping="channel", block_size=16, rank=0),
        HeadQConfig(key_bits=2, value_bits=2, channel_group=16, block_size=16, rank=0),
    ):
        cache, query = _filled_cache(config, tokens=40, seed=0)
        assert fused_decode_attention(cache.layers[0], query, None, 0.25, None) is None
    # 2-bit keys of a 32-channel head: planes of 8 channels, too narrow for a dot
    cache, query = _filled_cache(HeadQConfig(key_bits=2, block_size=16, rank=0), tokens=40, seed=0, head_dim=32)
    assert fused_decode_attention(cache.layers[0], query, None, 0.25, None) is None


HALF_PRECISION = [(torch.float16, 2e-3)]
if DEVICE.type == "cuda":  # Triton's interpreter gets bfloat16 dots wrong: bf16 caches are checked on the GPU only
    HALF_PRECISION.append((torch.bfloat16, 1e-2))


@pytest.mark.parametrize(("dtype", "tolerance"), HALF_PRECISION)
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_decode_half_precision_cache(monkeypatch, name, dtype, tolerance):
    """A half-precision cache against the float32 reference path on the same cache.

    float16 measured 5.8e-4 to 8.9e-4 under the interpreter; bfloat16 1.1e-3 on an H100
    (``benchmarks/decode_bench.py --check``).
    """
    from transformers_headq.fused_decode import fused_decode_attention

    config, head_dim = CASES[name]
    cache, query = _filled_cache(config, tokens=71, seed=1, head_dim=head_dim, dtype=dtype)
    layer = cache.layers[0]
    key, value = cache.update(*torch.randn(2, 3, 2, 1, head_dim, device=DEVICE, dtype=dtype), 0)
    query = query.float()  # not rounded, so that the reference output is float32
    fused = fused_decode_attention(layer, query, None, head_dim**-0.5, None)
    assert fused is not None
    monkeypatch.setenv("HEADQ_KERNELS", "0")
    reference, _ = headq_attention_forward(MODULE, query, key, value, None, scaling=head_dim**-0.5)
    assert ((fused - reference).norm() / reference.norm()).item() < tolerance


def test_launch_specialisation_follows_triton():
    """The fast launch keys compiled kernels by what Triton specialises on (alignment, 1, multiples of 16)."""
    from transformers_headq.kernels.decode import headq_merge_kernel
    from transformers_headq.kernels.launch import LaunchSite

    site = LaunchSite(headq_merge_kernel, {"G": 4, "BLOCK_G": 8, "D": 64, "S_PAD": 4, "CHUNK": 4}, {})
    buf = torch.zeros(64)

    def key(m=buf, n_splits=3):  # m_ptr, l_ptr, acc_ptr, out_ptr, n_splits
        return site.specialisation([m, buf, buf, buf, n_splits])

    assert key() == key(m=torch.ones(32)) != key(m=buf[1:])  # 4 bytes past a 16-byte boundary
    assert key(m=buf.double()) != key()  # dtypes
    assert key(n_splits=1) != key(n_splits=3)  # Triton turns 1 into a constant
    assert key(n_splits=32) != key(n_splits=33) == key(n_splits=3)  # and marks multiples of 16
    assert key(n_splits=2**40) != key(n_splits=3)  # 64-bit integers

    fixed = LaunchSite(type("K", (), {"arg_names": ["n"], "do_not_specialize": ["n"]})(), {}, {})
    assert fixed.specialisation([32]) == fixed.specialisation([33]) != fixed.specialisation([2**40])


def test_fused_decode_with_misaligned_query_after_aligned(monkeypatch):
    """A query whose address breaks 16-byte alignment gets its own compiled kernel, not the aligned one's.

    On a GPU the second and third calls go through the launcher's cache of compiled kernels.
    """
    from transformers_headq.fused_decode import fused_decode_attention

    config, head_dim = CASES["k2-r4s4-block-v2"]
    cache, query = _filled_cache(config, tokens=71, seed=3, head_dim=head_dim)
    layer = cache.layers[0]
    key, value = cache.update(*torch.randn(2, 3, 2, 1, head_dim, device=DEVICE), 0)
    storage = torch.zeros(query.numel() + 1, device=DEVICE)
    misaligned = storage[1:].view_as(query)
    misaligned.copy_(query)
    assert misaligned.data_ptr() % 16 != 0
    outputs = [fused_decode_attention(layer, q, None, 0.25, None) for q in (query, misaligned, query, misaligned)]
    monkeypatch.setenv("HEADQ_KERNELS", "0")
    reference, _ = headq_attention_forward(MODULE, query, key, value, None, scaling=0.25)
    for out in outputs:
        assert out is not None
        torch.testing.assert_close(out, reference, rtol=FLOAT32_TOLERANCE, atol=FLOAT32_TOLERANCE)


def test_fused_decode_after_a_layer_of_another_head_dim(monkeypatch):
    """Layers of different head dims with the same number of partial rows share no stale scratch space."""
    from transformers_headq.fused_decode import fused_decode_attention

    for name in ("k2-r4s4-block-v2", "k8-r20s4-token-v2", "k2-r4s4-block-v2"):  # head dims 64, 128, 64
        config, head_dim = CASES[name]
        cache, query = _filled_cache(config, tokens=71, seed=5, head_dim=head_dim)
        key, value = cache.update(*torch.randn(2, 3, 2, 1, head_dim, device=DEVICE), 0)
        fused = fused_decode_attention(cache.layers[0], query, None, 0.25, None)
        with monkeypatch.context() as patch:
            patch.setenv("HEADQ_KERNELS", "0")
            reference, _ = headq_attention_forward(MODULE, query, key, value, None, scaling=0.25)
        assert fused is not None
        torch.testing.assert_close(fused, reference, rtol=FLOAT32_TOLERANCE, atol=FLOAT32_TOLERANCE)


def test_copied_cache_decodes_like_the_original():
    """``copy.deepcopy`` of a cache after fused steps (reusing a prompt's cache) copies no compiled kernels."""
    import copy

    from transformers_headq.fused_decode import fused_decode_attention

    config, head_dim = CASES["k2-r4s4-block-v2"]
    cache, query = _filled_cache(config, tokens=71, seed=7, head_dim=head_dim)
    cache.update(*torch.randn(2, 3, 2, 1, head_dim, device=DEVICE), 0)
    assert fused_decode_attention(cache.layers[0], query, None, 0.25, None) is not None
    copied = copy.deepcopy(cache)
    step = torch.randn(2, 3, 2, 1, head_dim, device=DEVICE)
    cache.update(*step, 0)
    copied.update(*step, 0)
    original = fused_decode_attention(cache.layers[0], query, None, 0.25, None)
    again = fused_decode_attention(copied.layers[0], query, None, 0.25, None)
    assert original is not None and again is not None
    torch.testing.assert_close(again, original, rtol=0, atol=0)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fixed_capacity_kernel_matches_its_torch_path(monkeypatch, name, padded):
    """The custom op over a fixed-capacity cache (splits over the capacity, lengths read from the
    device, empty splits past them) computes what the fixed layer's torch path computes."""
    from transformers_headq import kernels
    from transformers_headq.static import StaticDecodeStates
    from transformers_headq.static_attention import static_decode_attention

    monkeypatch.setitem(kernels.LAUNCH, "min_split_tokens", 16)  # many splits, most of them empty
    config, head_dim = CASES[name]
    rank = config.rank or 0
    basis = basis_from_tensors_for(rank, 3, head_dim) if rank else None
    cache = HeadQCache(basis, config, num_layers=1, max_cache_len=200)
    gen = torch.Generator().manual_seed(len(name))
    states = torch.randn(2, 3, 2, 60, head_dim, generator=gen).to(DEVICE)
    cache.update(states[0, :, :, :40], states[1, :, :, :40], 0)
    for t in range(40, 60):
        states_out, _ = cache.update(states[0, :, :, t : t + 1], states[1, :, :, t : t + 1], 0)
    assert isinstance(states_out, StaticDecodeStates)
    layer = cache.layers[0]
    assert layer.quantized_length > 0 and layer.window_keys.shape[-2] > 0  # both parts are read
    assert kernels.kernels_enabled(DEVICE) and kernel_covers(layer)  # the op, not the torch path
    query = torch.randn(3, 4, 1, head_dim, generator=gen).to(DEVICE)
    mask = None
    if padded:  # left padding of 0, 9 and 40 tokens, over the whole capacity as transformers builds it
        mask = torch.arange(layer.capacity, device=DEVICE)[None, None, None, :] < 60
        mask = mask.repeat(3, 1, 1, 1)
        mask[1, ..., :9] = False
        mask[2, ..., :40] = False
    fused = static_decode_attention(states_out, query, mask, 0.25, 5.0)
    monkeypatch.setenv("HEADQ_KERNELS", "0")
    reference = static_decode_attention(states_out, query, mask, 0.25, 5.0)
    assert fused.shape == reference.shape == (3, 1, 4, head_dim)
    torch.testing.assert_close(fused, reference, rtol=FLOAT32_TOLERANCE, atol=FLOAT32_TOLERANCE)


def test_fixed_capacity_kernel_reads_sink_rows_only_once_block_0_is_stored(monkeypatch):
    """After a reset the sink rows still hold the old sequence's keys and no block is quantized: the kernel
    must take its sink count from the device (as the torch path masks by it), not from the rows it finds."""
    from transformers_headq import kernels
    from transformers_headq.static_attention import static_decode_attention

    config, head_dim = CASES["k2-r4s4-block-v2-sinks"]
    cache = HeadQCache(basis_from_tensors_for(config.rank, 3, head_dim), config, num_layers=1, max_cache_len=64)
    gen = torch.Generator().manual_seed(5)
    states = torch.randn(2, 3, 2, 40, head_dim, generator=gen).to(DEVICE)
    cache.update(states[0, :, :, :40], states[1, :, :, :40], 0)
    layer = cache.layers[0]
    assert layer.sink_keys is not None
    cache.reset()
    cache.update(states[0, :, :, :5], states[1, :, :, :5], 0)  # the window only: no quantized block
    states_out, _ = cache.update(states[0, :, :, 5:6], states[1, :, :, 5:6], 0)
    assert layer.quantized_length == 0 and layer.sink_keys is None
    assert layer._sink_rows.abs().sum() > 0  # stale rows that a wrong kernel would read
    assert kernels.kernels_enabled(DEVICE) and kernel_covers(layer)  # the op, not the torch path
    query = torch.randn(3, 4, 1, head_dim, generator=gen).to(DEVICE)
    fused = static_decode_attention(states_out, query, None, 0.25, None)
    monkeypatch.setenv("HEADQ_KERNELS", "0")
    reference = static_decode_attention(states_out, query, None, 0.25, None)
    torch.testing.assert_close(fused, reference, rtol=FLOAT32_TOLERANCE, atol=FLOAT32_TOLERANCE)
