"""Calibration captures post-RoPE queries, pools GQA heads, and reduces exactly across processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from transformers_headq import QueryBasis
from transformers_headq.basis import orthonormality_error
from transformers_headq.calibrate import QueryMoments, calibrate, observe_attention
from transformers_headq.corpus import batches

from .helpers import save_tiny_model_folder, tiny_model

IDS = torch.randint(1, 97, (6, 24), generator=torch.Generator().manual_seed(3))


def _expected_query_moment(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """E[q qᵀ] per KV head, with queries rebuilt by hand from the layer's projections and RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured = {}
    attn = model.model.layers[layer].self_attn
    handle = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    hidden = captured["hidden_states"]
    q = attn.q_proj(hidden).view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)
    cos, sin = captured["position_embeddings"]
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    kv = model.config.num_key_value_heads
    pooled = (
        q.double()
        .reshape(ids.shape[0], kv, -1, ids.shape[1], attn.head_dim)
        .transpose(0, 1)
        .reshape(kv, -1, attn.head_dim)
    )
    return pooled.transpose(1, 2) @ pooled / pooled.shape[1]


def test_captured_queries_are_post_rope_and_pooled():
    model = tiny_model()
    moments = QueryMoments(2, 16)
    with observe_attention(model, lambda layer, q, k: moments.add(q) if layer == 1 else None), torch.no_grad():
        model(input_ids=IDS, use_cache=False)
    torch.testing.assert_close(moments.sum_outer / moments.count[:, None, None], _expected_query_moment(model, IDS, 1))
    assert model.config._attn_implementation == "sdpa"  # restored


def test_each_layers_sums_are_kept_on_its_layers_device(monkeypatch):
    """Under ``device_map`` a layer's queries and keys are summed on that layer's device, not carried to the first
    one (``meta`` stands in for a second GPU: the layer placement is read from ``parallel.layer_devices``); the sums
    of a layer on the first device are those of a one-device run."""
    from transformers_headq import calibrate as calibration

    model = tiny_model()
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    one_device = calibration.accumulate_moments(model, [ids])
    monkeypatch.setattr(calibration, "layer_devices", lambda m: [torch.device("cpu"), torch.device("meta")])
    spread = calibration.accumulate_moments(model, [ids])
    queries, keys, errors, ranges = spread
    for sums in ([m.sum for m in queries], [m.sum for m in keys], [r.sum_square for r in ranges]):
        assert [t.device.type for t in sums] == ["cpu", "meta"]
    assert errors == []  # no key quantizer given
    assert torch.equal(spread[0][0].sum_outer, one_device[0][0].sum_outer)
    assert torch.equal(spread[3][0].sum_square, one_device[3][0].sum_square)


def test_calibrated_basis_is_the_eigenbasis():
    model = tiny_model()
    bases = calibrate(model, batches(IDS, 4), metadata={"corpus": "random ids"})
    layer = bases["query"].layers[1]
    second = _expected_query_moment(model, IDS, 1).float()
    assert orthonormality_error(layer.U) < 1e-5
    # U diagonalises E[q qᵀ] with the stored eigenvalues, in descending order.
    torch.testing.assert_close(
        layer.U.transpose(1, 2) @ second @ layer.U, torch.diag_embed(layer.eigenvalues), atol=1e-3, rtol=1e-4
    )
    assert (layer.eigenvalues[:, :-1] >= layer.eigenvalues[:, 1:]).all()
    assert bases["query"].metadata["calibration_tokens"] == IDS.numel()
    assert bases["key-pca"].kind == "key-pca"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model()
        bases = calibrate(model, batches(IDS[rank::world], 2))
        if rank == 0:
            bases["query"].save_pretrained(out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_calibration_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    from transformers_headq import QueryBasis

    two = QueryBasis.from_pretrained(tmp_path / "two")
    one = calibrate(tiny_model(), batches(IDS, 2))["query"]
    for a, b in zip(one.layers, two.layers, strict=True):
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.query_mean, b.query_mean, atol=1e-6, rtol=1e-6)
        # Same subspaces (eigenvector signs are fixed, so the vectors themselves agree).
        torch.testing.assert_close(a.U, b.U, atol=1e-5, rtol=0)
    assert two.metadata["calibration_tokens"] == IDS.numel()


def _calibrate_args(folder, words: int) -> list[str]:
    """`headq calibrate` arguments over a tiny model and a text file of ``words`` word pairs written in ``folder``."""
    text = " ".join(f"w{i % 89} w{(i * 7) % 83}" for i in range(words))
    corpus = folder / "text.txt"
    corpus.write_text("\n".join(text[i : i + 200] for i in range(0, len(text), 200)))
    save_tiny_model_folder(folder / "model", text)
    return ["calibrate", "--model", str(folder / "model"), "--corpus", str(corpus), "--seq-len", "32"]


def test_cli_records_the_cache_settings_a_basis_is_used_with(tmp_path):
    """`headq calibrate --sink-keys 1 --side-bits 4` writes settings that HeadQCache.from_pretrained then uses."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from transformers_headq import HeadQCache
    from transformers_headq.cli import app

    args = _calibrate_args(tmp_path, words=2000)
    args += ["--windows", "4", "--sink-keys", "1", "--side-bits", "4", "--output", str(tmp_path / "basis")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    cache = HeadQCache.from_pretrained(str(tmp_path / "basis"), model=model)
    assert (cache.config.sink_keys, cache.config.side_bits) == (1, 4)


@pytest.mark.slow
def test_torchrun_two_processes_through_the_cli_equal_one(tmp_path):
    """`headq calibrate` under torchrun (2 CPU processes, gloo) writes the single-process basis."""
    import subprocess
    import sys

    args = _calibrate_args(tmp_path, words=4000)
    args += ["--windows", "8", "--batch-size", "2", "--rank", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "transformers_headq.cli"]
    subprocess.run([*cli, *args, "--output", str(tmp_path / "one")], check=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_port", str(_free_port()), "-m", "transformers_headq.cli"]
    subprocess.run([*torchrun, *args, "--output", str(tmp_path / "two")], check=True, env=env)
    torchrun[torchrun.index("--master_port") + 1] = str(_free_port())
    split = [*args, "--tensor-parallel", "--output", str(tmp_path / "split")]
    subprocess.run([*torchrun, *split], check=True, env=env)
    one, two, tp = (QueryBasis.from_pretrained(tmp_path / name) for name in ("one", "two", "split"))
    assert one.metadata["calibration_tokens"] == two.metadata["calibration_tokens"] == 8 * 32
    assert tp.metadata["calibration_tokens"] == 8 * 32
    assert (one.metadata["processes"], two.metadata["processes"]) == (1, 2)
    for a, b, c in zip(one.layers, two.layers, tp.layers, strict=True):
        signs = torch.sign((a.U * b.U).sum(-2, keepdim=True))
        torch.testing.assert_close(b.U * signs, a.U, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.eigenvalues, a.eigenvalues, rtol=1e-9, atol=0)
        # tensor parallel: the model's own sums run in another order, so float32 rounding differs
        signs = torch.sign((a.U * c.U).sum(-2, keepdim=True))
        torch.testing.assert_close(c.U * signs, a.U, rtol=0, atol=1e-4)
        torch.testing.assert_close(c.eigenvalues, a.eigenvalues, rtol=1e-5, atol=1e-7)
