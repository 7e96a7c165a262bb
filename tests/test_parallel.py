"""HeadQ on split models: a tensor-parallel rank's heads are read from the model, its cache and
its calibration use exactly those heads, and torchrun with 2 CPU processes decodes like one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig, QueryBasis
from transformers_headq.errors import BasisMismatchError, UnsupportedModelError
from transformers_headq.parallel import tensor_parallel_kv_heads

from .helpers import random_basis, save_tiny_model_folder, tiny_model

PLAN = {"layers.*.self_attn.k_proj": "colwise", "layers.*.self_attn.v_proj": "colwise"}


class _Mesh:
    ndim = 1
    mesh_dim_names = ("tp",)

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def get_local_rank(self) -> int:
        return self.rank


def _split_model(tp_size: int, rank: int, plan: dict | None = None, local_heads: int | None = None):
    """A tiny GQA model dressed as one rank of a tensor-parallel split (what transformers sets)."""
    model = tiny_model("llama")  # 2 KV heads of dim 16
    per_rank = local_heads if local_heads is not None else 2 // tp_size
    for layer in model.model.layers:
        for projection in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            projection.weight.data = projection.weight.data[: per_rank * 16]
    model._tp_size = tp_size
    model._tp_plan = {f"model.{k}": v for k, v in (PLAN if plan is None else plan).items()}
    model._device_mesh = _Mesh(rank)
    return model


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_holds_its_contiguous_run_of_kv_heads(rank):
    assert tensor_parallel_kv_heads(_split_model(2, rank)) == slice(rank, rank + 1)


def test_a_whole_model_holds_every_head():
    assert tensor_parallel_kv_heads(tiny_model("llama")) is None


@pytest.mark.parametrize(
    ("plan", "local_heads", "match"),
    [
        ({"layers.*.self_attn.k_proj": "rowwise", "layers.*.self_attn.v_proj": "rowwise"}, None, "column splits"),
        (PLAN, 2, "cannot tell which KV heads"),
    ],
)
def test_splits_headq_cannot_follow_are_refused(plan, local_heads, match):
    with pytest.raises(UnsupportedModelError, match=match):
        tensor_parallel_kv_heads(_split_model(2, 0, plan, local_heads))


def test_kv_heads_the_ranks_do_not_divide_are_refused():
    model = _split_model(2, 0)
    model._tp_size = 4  # 2 KV heads over 4 ranks
    with pytest.raises(UnsupportedModelError, match="cannot be split evenly"):
        tensor_parallel_kv_heads(model)


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_cache_uses_its_slice_of_the_basis_and_the_check_still_refuses_other_models(rank):
    model = _split_model(2, rank)
    basis = random_basis(tiny_model("llama"), 4)
    cache = HeadQCache.from_pretrained(basis, model=model)
    assert cache.basis is not None and cache.basis.kv_heads == (rank, rank + 1)
    for layer, full in zip(cache.basis.layers, basis.layers, strict=True):
        torch.testing.assert_close(layer.U, full.U[rank : rank + 1], rtol=0, atol=0)
    other = random_basis(tiny_model("qwen3"), 4)  # head dim 16 too, another family
    with pytest.raises(BasisMismatchError):
        HeadQCache.from_pretrained(other, model=model)


def test_a_rank_share_of_a_basis_is_not_saved_as_a_basis(tmp_path):
    share = random_basis(tiny_model("llama"), 4).for_kv_heads(slice(1, 2))
    with pytest.raises(ValueError, match="tensor-parallel rank's share"):
        share.save_pretrained(tmp_path)


def test_a_cache_made_without_the_model_names_the_fix_on_a_rank():
    model = _split_model(2, 0)
    cache = HeadQCache(random_basis(tiny_model("llama"), 4), HeadQConfig(rank=4, block_size=8))
    with pytest.raises(ValueError, match="from_pretrained"):
        model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache)


# ------------------------------------------------------ 2 processes, gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_worker(worker: list[str], tensor_parallel: bool, flag: list[str] | None = None) -> None:
    """``worker`` in one process, or under torchrun in 2 with ``flag`` (default ``--tensor-parallel``) added."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if tensor_parallel:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        launch += ["--master_port", str(_free_port()), *worker, *(["--tensor-parallel"] if flag is None else flag)]
    else:
        launch = [sys.executable, *worker]
    subprocess.run(launch, check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


def _decode(tmp_path, family: str, tensor_parallel: bool) -> dict:
    out = tmp_path / f"{family}-{'tp' if tensor_parallel else 'one'}.json"
    worker = ["-m", "tests.parallel_worker", str(tmp_path / family), str(tmp_path / f"{family}-basis"), str(out)]
    _run_worker(worker, tensor_parallel)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tensor_parallel_decode_over_two_processes_equals_one(tmp_path, family):
    """tp_plan over 2 gloo processes: same greedy tokens and first logits as one process, and each
    rank's cache holds the full basis' decoder for its own KV head."""
    text = " ".join(f"w{i % 89} w{(i * 7) % 83}" for i in range(400))
    save_tiny_model_folder(tmp_path / family, text, family)
    model = tiny_model(family)
    basis = random_basis(model, 4)
    basis.quantizer = HeadQConfig(rank=4, side_bits=3, value_bits=2, block_size=8).to_dict()
    basis.save_pretrained(tmp_path / f"{family}-basis")
    one, split = _decode(tmp_path, family, False), _decode(tmp_path, family, True)
    assert split["tokens"] == one["tokens"]
    torch.testing.assert_close(torch.tensor(split["logits"]), torch.tensor(one["logits"]), rtol=1e-4, atol=1e-4)
    assert [r["kv_heads"] for r in split["ranks"]] == [[0, 1], [1, 2]]
    full = QueryBasis.from_pretrained(tmp_path / f"{family}-basis").layers[0].decoder_or_u
    for rank, info in enumerate(split["ranks"]):
        torch.testing.assert_close(torch.tensor(info["decoder"]), full[rank : rank + 1], rtol=0, atol=0)


# ------------------------------------------- layers on different devices
def _tensors(obj, seen=None):
    """Every tensor a cache layer holds (stores, buffers, window, its device copies of the basis); not the
    user's basis object it was given, which stays where the user keeps it."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("transformers_headq"):
        for name, value in vars(obj).items():
            if name != "basis":
                yield from _tensors(value, seen)


def test_each_layer_lives_on_the_device_of_its_keys():
    """A model split over devices (device_map) hands each cache layer keys on that layer's device:
    the layer allocates its stores, window and basis tensors there and attends there. ``meta`` stands
    in for a second device on a CPU-only machine: any tensor made on a default device would mix."""
    from transformers_headq import headq_attention_forward

    model = tiny_model("llama")
    basis = random_basis(model, 4)
    cache = HeadQCache(basis, HeadQConfig(rank=4, side_bits=3, value_bits=2, block_size=8))
    gen = torch.Generator().manual_seed(0)
    for layer_idx, device in enumerate(("cpu", "meta")):
        for tokens in (19, 1):  # a prefill that flushes two blocks, then a decode step
            keys, values = (torch.randn(2, 2, tokens, 16, generator=gen).to(device) for _ in range(2))
            k, v = cache.update(keys, values, layer_idx)
            query = torch.randn(2, 4, tokens, 16, generator=gen).to(device)
            out, _ = headq_attention_forward(torch.nn.Module().eval(), query, k, v, None)
            assert out.device.type == device
        held = list(_tensors(cache.layers[layer_idx]))
        assert len(held) > 8 and {t.device.type for t in held} == {device}


def test_a_fixed_capacity_layer_allocates_on_the_device_of_its_keys():
    """The fixed-capacity layer's one allocation (stores, device-side lengths, window) follows its
    first keys too. (Its prefill reads the lengths on the host, which ``meta`` cannot; the 2-GPU run
    covers the rest.)"""
    model = tiny_model("llama")
    cache = HeadQCache(random_basis(model, 4), HeadQConfig(rank=4, side_bits=3, block_size=8), max_cache_len=64)
    layer = cache.layers[1]
    keys = torch.zeros(2, 2, 5, 16, device="meta")
    layer.lazy_initialization(keys, keys)
    held = list(_tensors(layer))
    assert len(held) > 8 and {t.device.type for t in held} == {"meta"}


# ------------------------------------------------- decode speed on split models
@pytest.mark.parametrize("rank", [0, 1])
def test_speed_fills_a_rank_cache_with_its_share_of_the_kv_heads(rank):
    """``headq bench`` on a tensor-parallel rank: the random prefill has the rank's KV heads (a HeadQ cache
    holding the rank's share of the basis would refuse the full count), and its bytes are the rank's."""
    from transformers import DynamicCache

    from transformers_headq.factory import HeadQCacheFactory
    from transformers_headq.speed import fill_with_random_states

    model = _split_model(2, rank)
    dense = DynamicCache()
    fill_with_random_states(model, dense, batch=2, context=11)
    assert all(layer.keys.shape == (2, 1, 11, 16) for layer in dense.layers)
    factory = HeadQCacheFactory.from_pretrained(random_basis(tiny_model("llama"), 4), model, rank=4, block_size=8)
    cache = factory()
    fill_with_random_states(model, cache, batch=2, context=11)
    assert cache.get_seq_length() == 11 and cache.basis is not None and cache.basis.kv_heads == (rank, rank + 1)


def test_speed_fills_each_layer_on_the_device_of_its_weights():
    """A model spread by ``device_map``: each cache layer is filled on its model layer's device, where the
    layer's attention will read it (``meta`` stands in for a second GPU)."""
    from transformers import DynamicCache

    from transformers_headq.parallel import layer_devices
    from transformers_headq.speed import fill_with_random_states

    model = tiny_model("llama")
    model.model.layers[1].to("meta")
    assert [d.type for d in layer_devices(model)] == ["cpu", "meta"]
    dense = DynamicCache()
    fill_with_random_states(model, dense, batch=1, context=5)
    assert [layer.keys.device.type for layer in dense.layers] == ["cpu", "meta"]
    cache = HeadQCache(random_basis(model, 4), HeadQConfig(rank=4, side_bits=3, block_size=8))
    fill_with_random_states(model, cache, batch=1, context=19)
    for layer, device in zip(cache.layers, ("cpu", "meta"), strict=True):
        assert {t.device.type for t in _tensors(layer)} == {device}


@pytest.mark.slow
def test_bench_under_torchrun_tensor_parallel_times_each_rank_share(tmp_path):
    """``torchrun -m transformers_headq.cli bench --tensor-parallel`` over 2 gloo processes: rank 0 reports
    every cache, and the KV bytes a token its cache holds are half of one process's (its share of the heads)."""
    text = " ".join(f"w{i % 89} w{(i * 7) % 83}" for i in range(400))
    save_tiny_model_folder(tmp_path / "llama", text)
    basis = random_basis(tiny_model("llama"), 4)
    basis.quantizer = HeadQConfig(rank=4, side_bits=3, value_bits=2, block_size=8).to_dict()
    basis.save_pretrained(tmp_path / "basis")
    rows = {}
    for tensor_parallel in (False, True):
        out = tmp_path / f"bench-{tensor_parallel}.json"
        args = ["-m", "transformers_headq.cli", "bench", "--model", str(tmp_path / "llama"), "--basis"]
        args += [str(tmp_path / "basis"), "--context", "40", "--batch", "2", "--steps", "2"]
        _run_worker([*args, "--caches", "dynamic,headq", "--json", str(out)], tensor_parallel)
        rows[tensor_parallel] = {r["cache"]: r for r in json.loads(out.read_text())}
    assert list(rows[True]) == list(rows[False]) == ["dynamic", "headq"]
    for cache in ("dynamic", "headq"):
        assert rows[True][cache]["kv_bytes_per_token"] == rows[False][cache]["kv_bytes_per_token"] / 2
        assert rows[True][cache]["tokens_per_s"] > 0


@pytest.mark.slow
def test_multigpu_decode_benchmark_compares_each_split_with_one_process(tmp_path):
    """``benchmarks/decode_multigpu.py`` (the 2-GPU record of issue 19) on CPU: one process, then 2 gloo
    tensor-parallel ranks, then device_map; each split's next-token argmaxes, fed one process's greedy tokens, are
    compared with them (identical in float32 on CPU), and its rows, the compiled fixed-capacity decode's included,
    land in one JSON beside the reference's."""
    text = " ".join(f"w{i % 89} w{(i * 7) % 83}" for i in range(400))
    save_tiny_model_folder(tmp_path / "llama", text)
    out = tmp_path / "multigpu.json"
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "decode_multigpu.py")
    common = ["--model", str(tmp_path / "llama"), "--json", str(out), "--check-tokens", "12", "--steps", "2"]
    timed = "headq@160x2,headq-compiled@160x2,dynamic@160x2"
    for parallel in ("one", "tp", "device_map"):
        _run_worker([script, *common, "--rows", timed, "--parallel", parallel], parallel == "tp", [])
    rows = json.loads(out.read_text())
    checks = {r["parallel"]: r for r in rows if "check" in r}
    speeds = {(r["parallel"], r["cache"]): r for r in rows if "cache" in r}
    assert set(checks) == {"one", "tp", "device_map"} and len(speeds) == 9
    assert not [r for r in rows if "skipped" in r]  # the compiled decode runs on every split too
    assert len(checks["one"]["headq_tokens"]) == 12 and "same_tokens_as_one_gpu" not in checks["one"]
    for parallel in ("tp", "device_map"):
        assert checks[parallel]["same_tokens_as_one_gpu"] and checks[parallel]["dynamic_same_tokens_as_one_gpu"]
        assert speeds[parallel, "headq"]["same_tokens_as_one_gpu"] is True
    assert speeds["one", "headq"]["same_tokens_as_one_gpu"] is None  # the reference itself
    assert checks["tp"]["processes"] == 2 and checks["device_map"]["processes"] == 1
    for cache in ("headq", "headq-compiled", "dynamic"):
        assert speeds["tp", cache]["kv_bytes_per_token"] == speeds["one", cache]["kv_bytes_per_token"] / 2
        assert speeds["device_map", cache]["kv_bytes_per_token"] == speeds["one", cache]["kv_bytes_per_token"]


def test_bench_refuses_several_processes_without_tensor_parallel(monkeypatch):
    from typer.testing import CliRunner

    from transformers_headq.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["bench", "--context", "64"])
    assert result.exit_code == 2 and "--tensor-parallel" in result.output


@pytest.mark.slow
def test_calibration_under_tensor_parallelism_gathers_the_full_basis(tmp_path):
    """Each rank adds the statistics of its own KV heads; the all-reduce assembles the whole model's
    basis, equal to one process's."""
    text = " ".join(f"w{i % 89} w{(i * 7) % 83}" for i in range(400))
    save_tiny_model_folder(tmp_path / "llama", text)
    for tensor_parallel in (False, True):
        basis = tmp_path / ("tp" if tensor_parallel else "one")
        worker = ["-m", "tests.parallel_worker", str(tmp_path / "llama"), str(basis), "-", "--calibrate"]
        _run_worker(worker, tensor_parallel)
    one, split = QueryBasis.from_pretrained(tmp_path / "one"), QueryBasis.from_pretrained(tmp_path / "tp")
    assert one.metadata["calibration_tokens"] == split.metadata["calibration_tokens"] == 4 * 24
    for a, b in zip(one.layers, split.layers, strict=True):
        torch.testing.assert_close(b.eigenvalues, a.eigenvalues, rtol=1e-5, atol=1e-7)
        signs = torch.sign((a.U * b.U).sum(-2, keepdim=True))
        torch.testing.assert_close(b.U * signs, a.U, rtol=0, atol=1e-4)
