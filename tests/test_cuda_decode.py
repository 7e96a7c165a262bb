"""The CUDA decode kernel (``kernels/cuda``): what it covers, how it splits work, that it builds, and (on a GPU)
that it computes what the float32 torch path computes.

Without a GPU the kernel cannot run (it is CUDA C++, not Triton: no interpreter); these tests then check its
rules, its fallback, and that ``nvcc`` (where installed) compiles it for Hopper without spilling.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig
from transformers_headq.attention import headq_attention_forward
from transformers_headq.kernels import DecodeSettings, cuda_decode
from transformers_headq.kernels.cuda_decode import LAUNCH, TILE, settings_covered, splits

from .test_attention import MODULE
from .test_kernels import basis_from_tensors_for

DEFAULT = HeadQConfig(key_bits=2, value_bits=2, block_size=64, rank=16, side_bits=4, side_scale="block")


def _settings(config: HeadQConfig, head_dim: int = 128, q_heads: int = 32, kv_heads: int = 8,
              dtype: torch.dtype = torch.bfloat16) -> DecodeSettings:  # fmt: skip
    quantizers = (config.key_quantizer(head_dim), config.side_quantizer(config.rank or 0),
                  config.value_quantizer(head_dim))  # fmt: skip
    return DecodeSettings(quantizers, config.rank or 0, config.block_size, kv_heads, head_dim, q_heads, dtype)


@pytest.mark.parametrize(
    ("config", "overrides", "covered"),
    [
        (DEFAULT, {}, True),
        (DEFAULT.replace(rank=0), {}, True),  # no side code
        (DEFAULT.replace(block_size=128), {}, True),
        (DEFAULT, {"dtype": torch.float16}, True),
        (DEFAULT, {"q_heads": 8 * 7}, True),  # 7 query heads a KV head
        (DEFAULT, {"head_dim": 64}, False),
        (DEFAULT, {"dtype": torch.float32}, False),
        (DEFAULT, {"q_heads": 8 * 16}, False),  # more query heads a KV head than a product's 8 columns
        (DEFAULT.replace(key_bits=3), {}, False),
        (DEFAULT.replace(value_bits=4), {}, False),
        (DEFAULT.replace(value_bits=None), {}, False),  # dense values
        (DEFAULT.replace(rank=8), {}, False),
        (DEFAULT.replace(side_scale="token"), {}, False),
        (DEFAULT.replace(block_size=32), {}, False),
        (DEFAULT.replace(meta_dtype="float32"), {}, False),
    ],
)
def test_settings_the_kernel_covers(config, overrides, covered):
    assert settings_covered(_settings(config, **overrides)) is covered


@pytest.mark.parametrize("batch_heads", [1, 8, 64, 256, 1024])
@pytest.mark.parametrize("n_tokens", [64, 256, 4096, 32768, 131072])
@pytest.mark.parametrize("sms", [4, 132])
def test_splits_cover_the_tokens_in_one_wave(batch_heads, n_tokens, sms):
    n_splits, per_split = splits(batch_heads, n_tokens, sms)
    assert per_split % TILE == 0
    assert (n_splits - 1) * per_split < n_tokens <= n_splits * per_split  # every token, no empty split
    assert per_split >= min(LAUNCH["min_split_tokens"], n_tokens)
    # one wave of thread blocks, unless one split a (sequence, KV head) is already more
    assert batch_heads * n_splits <= max(LAUNCH["wave_blocks_per_sm"] * sms, batch_heads)


def test_short_splits_take_one_block_an_sm_fewer():
    """Splits of a few tiles a warp are lengthened by filling one block an SM fewer; long ones fill the wave."""
    wave = LAUNCH["wave_blocks_per_sm"]
    n_splits, per_split = splits(8, 32768, 132)  # a full wave would give 8 x 49 splits of 11 tiles
    assert per_split // TILE >= LAUNCH["short_split_tiles"]
    assert (wave - 2) * 132 < 8 * n_splits <= (wave - 1) * 132  # one wave of one block an SM fewer
    n_splits, per_split = splits(64, 32768, 132)  # 6 splits of 86 tiles: kept
    assert per_split // TILE >= LAUNCH["short_split_tiles"] and 64 * n_splits > (wave - 1) * 132


def test_build_failure_warns_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("nvcc: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cuda_decode._build.cache_clear()
    try:
        with pytest.warns(UserWarning, match="Triton kernel instead.*nvcc"):
            assert cuda_decode.extension() is None
    finally:
        cuda_decode._build.cache_clear()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler (nvcc) on this machine")
def test_kernel_compiles_for_hopper_without_spills(tmp_path):
    """The source builds for sm_90 (as torch builds it on an H100/H200), and the kernels of the default settings
    (side code, no soft-capping) fit the register cap of LAUNCH's blocks per SM with no spills. Without the side
    code a word or two may spill: at the 168-register cap ptxas spills one value of that kernel around its
    full-precision window (not in the tile loop; the SASS was read when this bound was set); more would mean the
    register budget broke. Soft-capping (tanh) is not held to it."""
    flags = cuda_decode.build_flags(LAUNCH["blocks_per_sm"], LAUNCH["stages"])
    result = subprocess.run(
        ["nvcc", "-arch=sm_90", *flags, "-cubin", "-Xptxas", "-v",
         "-o", str(tmp_path / "decode.cubin"), str(cuda_decode.SOURCES / "decode.cu")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = result.stderr.splitlines()
    entries = [i for i, line in enumerate(report) if "Compiling entry function" in line]
    assert len(entries) == 8  # bf16/fp16 x side code or not x soft-capping or not
    for i in entries:
        name, properties = report[i], report[i + 2]
        spilled = re.search(r"(\d+) bytes spill stores", properties)
        assert spilled is not None, properties
        if "Lb1ELb0EEEv" in name:  # SIDE, not SOFTCAP: the default settings
            assert int(spilled.group(1)) == 0, (name, properties)
        elif "Lb0EEEv" in name:  # not SOFTCAP (soft-capping's tanh is the rare, slower case)
            assert int(spilled.group(1)) <= 8, (name, properties)


def _cuda_headers() -> Path | None:
    """A folder with the CUDA runtime's headers: the toolkit's, or the copy Triton's NVIDIA backend ships."""
    folders = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin is not None:
        folders.append(Path(triton.origin).parent / "backends" / "nvidia" / "include")
    return next((folder for folder in folders if (folder / "cuda_runtime_api.h").is_file()), None)


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_headers() is None, reason="no g++ or CUDA runtime headers")
def test_binding_compiles_against_torch_headers(tmp_path):
    """The torch binding (``binding.cpp``) is C++ that only a GPU machine builds: check here that it compiles,
    warnings included, against the installed torch's headers. (A CPU wheel of torch lacks one generated CUDA
    header, which this test supplies empty: it only holds build macros.)"""
    from torch.utils.cpp_extension import include_paths

    generated = tmp_path / "c10" / "cuda" / "impl"
    generated.mkdir(parents=True)
    (generated / "cuda_cmake_macros.h").write_text("#pragma once\n")
    system = [*include_paths(), str(tmp_path), str(_cuda_headers()), sysconfig.get_paths()["include"]]
    result = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
         *(f"-isystem{folder}" for folder in system), f"-I{cuda_decode.SOURCES}", "-DTORCH_EXTENSION_NAME=headq",
         str(cuda_decode.SOURCES / "binding.cpp")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]


def test_a_layers_launch_is_made_again_exactly_when_its_stores_change(monkeypatch):
    """A growing layer keeps its CUDA launch (``store_launch``: the stores' addresses, checked once) from step to
    step and makes a new one when a block flush gives its stores new tensors: a kept launch must never read stores
    that moved, nor keep the old ones in memory. Each step passes the layer's current window. (On CPU: the launch is
    a stand-in that records, weakly, what it was made for and what it was given; the kernel runs only on a GPU.)"""
    import weakref

    from transformers_headq import fused_decode

    made: list[tuple[weakref.ref, ...]] = []
    steps: list[tuple[int, torch.Tensor]] = []

    def fake_store_launch(query, decoder, keys, side, values, sink_keys, block, lengths=None, counters=None):
        made.append(tuple(weakref.ref(t) for t in (keys.codes, side.codes, values.codes)))
        index = len(made) - 1

        def step(q, window_keys, window_values, valid, scaling, softcap):
            steps.append((index, window_keys))
            return torch.zeros(q.shape[0], 1, q.shape[1], q.shape[3], dtype=q.dtype)

        return step

    monkeypatch.setattr(cuda_decode, "store_launch", fake_store_launch)
    monkeypatch.setattr(cuda_decode, "covers", lambda *args: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # fused kernels enabled for CPU tensors (also on a GPU machine)
    gen = torch.Generator().manual_seed(3)
    cache = HeadQCache(basis_from_tensors_for(16, 0, 128, kv_heads=8), DEFAULT)
    cache.update(*(torch.randn(1, 8, 100, 128, generator=gen).bfloat16() for _ in "kv"), 0)
    layer = cache.layers[0]
    store_states = 0
    for _ in range(2 * DEFAULT.block_size):
        before = None if not made else tuple(ref() for ref in made[-1])
        cache.update(*(torch.randn(1, 8, 1, 128, generator=gen).bfloat16() for _ in "kv"), 0)
        views = (layer.key_store.packed().codes, layer.side_store.packed().codes, layer.value_store.packed().codes)
        store_states += before is None or any(a is not b for a, b in zip(before, views, strict=True))
        del before
        query = torch.randn(1, 32, 1, 128, generator=gen).bfloat16()
        assert fused_decode.fused_decode_attention(layer, query, None, 128**-0.5, None) is not None
        index, window = steps[-1]
        assert all(ref() is view for ref, view in zip(made[index], views, strict=True)), "read stores that moved"
        assert window is layer.window_keys
    assert 2 <= store_states == len(made)  # one launch for each state of the stores, made when it changed
    del views
    layer.reset()  # the layer lives on, its stores go: nothing kept beside it may hold them
    assert all(ref() is None for refs in made for ref in refs), "a kept launch holds a layer's old stores"


# ---------------------------------------------------------------------------------------------- on a GPU
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs an NVIDIA GPU")


@pytest.fixture
def cuda_launches(monkeypatch):
    """Whether each step given to the CUDA kernel ran on it (False: the layout did not fit, the Triton kernel ran
    instead): the launches ``store_launch`` makes, counted when they run."""
    launches: list[bool] = []
    real = cuda_decode.store_launch

    def counted(*args, **kwargs):
        made = real(*args, **kwargs)
        if made is None:
            launches.append(False)
            return None

        def step(*step_args):
            out = made(*step_args)
            launches.append(out is not None)
            return out

        return step

    monkeypatch.setattr(cuda_decode, "store_launch", counted)
    return launches


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [DEFAULT, DEFAULT.replace(rank=0, sink_keys=4), DEFAULT.replace(block_size=128)])
@pytest.mark.parametrize(("tokens", "batch"), [(150, 3), (1000, 1), (3000, 2)])  # one split, several, a window
@pytest.mark.parametrize("variant", ["plain", "padded", "softcap"])
def test_cuda_kernel_matches_reference(monkeypatch, cuda_launches, dtype, config, tokens, batch, variant):
    gen = torch.Generator().manual_seed(tokens + batch)
    keys = torch.randn(batch, 8, tokens, 128, generator=gen) * torch.linspace(0.2, 3, 128)
    values = torch.randn(batch, 8, tokens, 128, generator=gen)
    cache = HeadQCache(basis_from_tensors_for(16, 0, 128, kv_heads=8), config)
    cache.update(keys.cuda().to(dtype), values.cuda().to(dtype), 0)
    layer = cache.layers[0]
    k, v = cache.update(*(torch.randn(batch, 8, 1, 128, generator=gen).cuda().to(dtype) for _ in range(2)), 0)
    query = torch.randn(batch, 32, 1, 128, generator=gen).cuda().to(dtype)
    mask = None
    if variant == "padded":
        mask = torch.ones(batch, 1, 1, layer.stored_length, dtype=torch.bool, device="cuda")
        mask[::2, ..., :37] = False
    softcap = 5.0 if variant == "softcap" else None
    fused, _ = headq_attention_forward(MODULE, query, k, v, mask, softcap=softcap)
    monkeypatch.setenv("HEADQ_KERNELS", "0")
    reference, _ = headq_attention_forward(MODULE, query.float(), k, v, mask, softcap=softcap)
    assert cuda_launches == [True], "the CUDA kernel did not run"
    error = ((fused.float() - reference).norm() / reference.norm()).item()
    assert error < (1e-2 if dtype == torch.bfloat16 else 2e-3), error


@GPU
def test_cuda_kernel_takes_a_query_at_an_odd_offset(cuda_launches):
    """The kernel loads the query 16 bytes at once; a query view that is not 16-byte aligned is copied by the
    binding (not sent to the Triton kernel, not read misaligned) and gives the same output as an aligned one."""
    gen = torch.Generator().manual_seed(7)
    cache = HeadQCache(basis_from_tensors_for(16, 0, 128, kv_heads=8), DEFAULT)
    cache.update(*(torch.randn(2, 8, 700, 128, generator=gen).cuda().bfloat16() for _ in range(2)), 0)
    k, v = cache.update(*(torch.randn(2, 8, 1, 128, generator=gen).cuda().bfloat16() for _ in range(2)), 0)
    wide = torch.randn(2, 32, 1, 129, generator=gen).cuda().bfloat16()
    odd = wide[..., 1:]  # 2-byte offset: not 16-byte aligned
    assert odd.data_ptr() % 16 != 0
    shifted, _ = headq_attention_forward(MODULE, odd, k, v, None)
    aligned, _ = headq_attention_forward(MODULE, odd.contiguous(), k, v, None)
    assert cuda_launches == [True, True]
    torch.testing.assert_close(shifted, aligned, rtol=0, atol=0)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@GPU
@pytest.mark.parametrize(("tokens", "batch"), [(20000, 1), (9000, 3)])  # most tiles claimed at run time
def test_claimed_and_dealt_tiles_both_match_reference_and_dealt_ones_repeat_bits(
    monkeypatch, cuda_launches, tokens, batch
):
    """Warps claim their tiles at run time unless torch asks for deterministic algorithms, when each split's tiles
    are dealt to its warps. Long enough that most tiles are claimed (splits x warps fixed first tiles are far
    fewer), with sink keys (tile 0 must stay with split 0's warp 0) and a padding mask read by tile: both
    schedules match the float32 path, and the dealt one gives the same bits at every launch."""
    gen = torch.Generator().manual_seed(tokens)
    config = DEFAULT.replace(sink_keys=4)
    cache = HeadQCache(basis_from_tensors_for(16, 0, 128, kv_heads=8), config)
    keys = torch.randn(batch, 8, tokens, 128, generator=gen) * torch.linspace(0.2, 3, 128)
    cache.update(keys.cuda().bfloat16(), torch.randn(batch, 8, tokens, 128, generator=gen).cuda().bfloat16(), 0)
    k, v = cache.update(*(torch.randn(batch, 8, 1, 128, generator=gen).cuda().bfloat16() for _ in range(2)), 0)
    stored = cache.layers[0].stored_length
    n_splits, per_split = splits(batch * 8, stored, torch.cuda.get_device_properties(0).multi_processor_count)
    assert n_splits * 4 * TILE < stored / 2, "most tiles should be claimed"
    query = torch.randn(batch, 32, 1, 128, generator=gen).cuda().bfloat16()
    mask = torch.ones(batch, 1, 1, stored, dtype=torch.bool, device="cuda")
    mask[-1, ..., : per_split + 100] = False  # the last sequence's first split and a tile of the next: padding

    claimed, _ = headq_attention_forward(MODULE, query, k, v, mask)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        dealt = [headq_attention_forward(MODULE, query, k, v, mask)[0] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("HEADQ_KERNELS", "0")
    reference, _ = headq_attention_forward(MODULE, query.float(), k, v, mask)
    assert cuda_launches == [True] * 4
    assert _relative_error(claimed, reference) < 1e-2
    assert _relative_error(dealt[0], reference) < 1e-2
    assert all(torch.equal(d, dealt[0]) for d in dealt[1:])


@GPU
@pytest.mark.parametrize("held", [100, 1500, 6000])  # a block and a window; a few splits' worth; most of it
@pytest.mark.parametrize("claimed", [True, False])
def test_cuda_kernel_over_a_fixed_capacity_cache_matches_reference(monkeypatch, cuda_launches, held, claimed):
    """The fixed-capacity op on the CUDA kernel: splits over a capacity of 8192 tokens, lengths read from the
    device, tiles claimed by all splits (or dealt by split, the empty ones writing empty partials). It matches the
    fixed layer's torch path and leaves the layer's kernel counters at zero for the next launch (a CUDA graph
    replays it with the same counters)."""
    from transformers_headq.kernels import STATE_COUNTS
    from transformers_headq.static import StaticDecodeStates
    from transformers_headq.static_attention import static_decode_attention

    gen = torch.Generator().manual_seed(held)
    cache = HeadQCache(basis_from_tensors_for(16, 0, 128, kv_heads=8), DEFAULT, num_layers=1, max_cache_len=8192)
    states = torch.randn(2, 2, 8, held + 1, 128, generator=gen).cuda().bfloat16()
    cache.update(states[0, :, :, :held], states[1, :, :, :held], 0)
    out, _ = cache.update(states[0, :, :, held:], states[1, :, :, held:], 0)
    assert isinstance(out, StaticDecodeStates)
    query = torch.randn(2, 32, 1, 128, generator=gen).cuda().bfloat16()
    torch.use_deterministic_algorithms(not claimed, warn_only=True)
    try:
        fused = static_decode_attention(out, query, None, 128**-0.5, None)
    finally:
        torch.use_deterministic_algorithms(False)
    counters = cache.layers[0].state[STATE_COUNTS:]
    monkeypatch.setenv("HEADQ_KERNELS", "0")
    reference = static_decode_attention(out, query.float(), None, 128**-0.5, None)
    assert cuda_launches == [True]
    assert _relative_error(fused, reference) < 1e-2
    assert counters.numel() == 2 * 8 and not counters.any()


@GPU
@pytest.mark.slow
def test_compiled_model_decode_on_the_kernel_is_as_close_to_bf16_as_eager_decode(monkeypatch):
    """A small bf16 Llama with the kernel's shapes (head dim 128, 4 query heads a KV head, blocks of 64), fixed
    capacity, through ``benchmarks/decode_e2e.py``'s check: compiled (CUDA graphs) HeadQ and a second eager HeadQ
    decode, fed eager HeadQ's greedy tokens, against eager bf16. With tiles dealt (deterministic) a second eager
    decode repeats eager's logits to the bit; compiling may store a code at a rounding tie the other way, but must
    not take HeadQ further from bf16 than eager HeadQ is, give or take what compiling moves bf16's own logits by."""
    from transformers_headq import HeadQCacheFactory, enable_headq_attention
    from transformers_headq.fingerprint import model_fingerprint

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    from compiled_vs_eager_sensitivity import random_llama
    from decode_bench import HEADQ, random_basis
    from decode_e2e import check_tokens

    assert cuda_decode.extension() is not None, "the CUDA kernel did not build"
    model = random_llama(0.02, layers=4, device="cuda")  # transformers' default initialisation
    enable_headq_attention(model)
    factory = HeadQCacheFactory(random_basis(16, model_fingerprint(model.config)), HEADQ, model.config)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        found = check_tokens(model, factory, new_tokens=64, prompt_len=200)
    finally:
        torch.use_deterministic_algorithms(False)
    assert found["headq_eager_again"]["same_tokens"] and found["headq_eager_again"]["logit_relative_error_max"] == 0
    eager, compiled, control = found["headq_eager_vs_bf16"], found["headq_compiled_vs_bf16"], found["control"]
    for statistic in "logit_relative_error_median", "logit_relative_error_max":
        assert compiled[statistic] <= eager[statistic] + control[statistic], (statistic, found)
