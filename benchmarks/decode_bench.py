"""GPU decode speed of HeadQCache against DynamicCache (bf16, sdpa) and quanto 2-bit.

Shapes of Llama-3-8B (32 query heads, 8 KV heads, head dim 128; random weights are fine for
timing). Caches are filled with random states directly (a 32k x 32 prefill through the model would
only measure prefill), then one decode step is timed:

- ``attention``: one layer's decode attention per step, as ratios to bf16 sdpa on dense K/V in the
  same run (``dynamic-bf16``: the backend torch picks, cuDNN on an H100; ``dynamic-bf16-flash``: its
  flash backend forced) (HeadQ: the fused kernel with its window merge and ``qW``; quanto: what its cache does
  per step, a dequantization of the cache then sdpa);
- ``e2e``: a whole-model decode step (32 layers) with each cache, tokens per second;
- KV bytes per token, achieved bandwidth as a share of the copy bandwidth measured here, and the
  largest batch x context that fits a memory budget for each cache.

    python benchmarks/decode_bench.py --check --json benchmarks/decode-bench.json --markdown benchmarks/decode-bench.md
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from transformers_headq import HeadQCache, HeadQConfig
from transformers_headq.attention import headq_attention_forward
from transformers_headq.fused_decode import fused_decode_attention
from transformers_headq.kernels import LAUNCH
from transformers_headq.speed import sdpa_backend

Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32
DATASHEET_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM datasheets; else the measured copy
# The library's defaults made explicit (one exact sink key); `headq-nosink` rows drop the sink.
HEADQ = HeadQConfig(key_bits=2, value_bits=2, block_size=64, rank=16, side_bits=4, side_scale="block", sink_keys=1)


class _Module(torch.nn.Module):
    training = False


def bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` timed with CUDA events (warm-up and repetitions in milliseconds)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def host_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Host microseconds a call of ``fn`` takes to return (launches queued, nothing waited for): what an eager
    step pays before the GPU has its work, whatever the GPU's time."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - started) / calls
    torch.cuda.synchronize()
    return host * 1e6


def _graph_ms(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (what the kernels cost without Python/launch overhead)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write), the achievable ceiling."""
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms / 1e3)


def random_basis(rank: int, fingerprint: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
    """Seeded random orthonormal directions for every layer and KV head, the same in every process: for the
    Llama-3-8B shapes here, or for a model's own ``fingerprint`` (a basis its cache's checks accept)."""
    from transformers_headq.basis import LayerBasis, QueryBasis

    fp = fingerprint or {
        "model_type": "llama",
        "num_hidden_layers": LAYERS,
        "num_attention_heads": Q_HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rope": {},
    }
    heads, dim = fp["num_key_value_heads"], fp["head_dim"]
    layers = []
    for i in range(fp["num_hidden_layers"]):
        gen = torch.Generator().manual_seed(i)
        u, _ = torch.linalg.qr(torch.randn(heads, dim, dim, generator=gen, dtype=torch.float64))
        layers.append(LayerBasis(u[..., :rank].float(), torch.ones(heads, dim), torch.zeros(heads, dim)))
    return QueryBasis(layers, fp)


def fill_headq_layer(layer, batch: int, context: int, chunk: int = 4096, dtype=torch.bfloat16) -> None:
    """Append ``context`` random tokens (keys with channel outliers) in chunks, as a prefill would."""
    scale = torch.linspace(0.3, 4.0, HEAD_DIM, device="cuda", dtype=dtype)
    done = 0
    while done < context:
        n = min(chunk, context - done)
        k = torch.randn(batch, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=dtype) * scale
        v = torch.randn(batch, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=dtype)
        layer.update(k, v)
        done += n


# Kernel operands are in the cache's dtype with float32 accumulation, as sdpa computes: bf16 operands
# land between 1e-3 and 1e-2 of a float32 reference, float32 ones (TF32 tensor cores) near 1e-3.
CHECK_TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 2e-3}


def check(contexts=(1000, 4100), batches=(1, 3)) -> list[dict[str, Any]]:
    """Kernel against the float32 torch reference path on the GPU, for bf16 and float32 caches."""
    rows = []
    basis = random_basis(16)
    module = _Module()
    configs = {
        "K2 r16 s4/block V2": HEADQ,
        "K2 r8 s2/token dense V": HEADQ.replace(value_bits=None, rank=8, side_bits=2, side_scale="token"),
        "K2 no side, V4": HEADQ.replace(rank=0, value_bits=4),
        "K2 r16 s4/block V2 sink4": HEADQ.replace(sink_keys=4),
    }
    for dtype, tolerance in CHECK_TOLERANCE.items():
        for name, config in configs.items():
            for context in contexts:
                for batch in batches:
                    cache = HeadQCache(basis, config)
                    layer = cache.layers[0]
                    fill_headq_layer(layer, batch, context, dtype=dtype)
                    # a float32 query, so that the reference output is not rounded to bf16
                    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.float32)
                    new = [torch.randn(batch, KV_HEADS, 1, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(2)]
                    k, v = layer.update(*new)
                    fused = fused_decode_attention(layer, q, None, HEAD_DIM**-0.5, None)
                    assert fused is not None
                    os.environ["HEADQ_KERNELS"] = "0"
                    reference, _ = headq_attention_forward(module, q, k, v, None)
                    os.environ["HEADQ_KERNELS"] = "1"
                    err = ((fused - reference).norm() / reference.norm()).item()
                    dt = str(dtype).removeprefix("torch.")
                    rows.append({"config": name, "dtype": dt, "context": context, "batch": batch, "rel_error": err})
                    print(f"check {name:24s} {dt:8s} T={context:5d} B={batch}: rel error {err:.2e}", flush=True)
                    assert err < tolerance, (err, tolerance)
    return rows


def attention_row(cache: str, batch: int, context: int, peak: float) -> dict[str, Any]:
    """One layer's decode attention per step for one cache kind."""
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    dense_bytes_per_token = 2 * KV_HEADS * HEAD_DIM * 2
    graph_ms = None
    if cache.startswith("dynamic-bf16"):
        k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        with sdpa_backend(cache.endswith("-flash")):
            ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        bytes_per_token, read = dense_bytes_per_token, 2 * k.numel() * 2
    elif cache in ("headq", "headq-nosink"):  # headq-nosink: no exact sink key (HeadQConfig.sink_keys=0)
        config = HEADQ.replace(sink_keys=0) if cache == "headq-nosink" else HEADQ
        layer = HeadQCache(random_basis(HEADQ.rank or 0), config).layers[0]
        fill_headq_layer(layer, batch, context)
        ms = bench(lambda: fused_decode_attention(layer, q, None, HEAD_DIM**-0.5, None))
        graph_ms = _graph_ms(lambda: fused_decode_attention(layer, q, None, HEAD_DIM**-0.5, None))
        bytes_per_token = (layer.key_nbytes() + layer.value_nbytes()) / (batch * context)
        read = bytes_per_token * batch * context
    else:  # quanto: the cache dequantizes everything it holds at each update, then sdpa
        from transformers import LlamaConfig, QuantizedCache

        shape = LlamaConfig(
            hidden_size=4096, num_hidden_layers=1, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS
        )
        qc = QuantizedCache(backend="quanto", config=shape, nbits=2, q_group_size=64, residual_length=128)
        k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        qc.update(k, torch.randn_like(k), 0)
        del k
        one = torch.randn(batch, KV_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

        def step() -> None:  # the cache grows by one token per call: negligible against ``context``
            keys, values = qc.update(one, one, 0)
            F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)

        ms = bench(step, warmup=2, rep=10)
        from transformers_headq.evaluate import quanto_bits_per_element

        key_bits, value_bits = quanto_bits_per_element(qc)  # codes, group scales and shifts, residual
        bytes_per_token = KV_HEADS * HEAD_DIM * (key_bits + value_bits) / 8
        read = bytes_per_token * batch * context
    return {
        "cache": cache,
        "context": context,
        "batch": batch,
        "attn_ms_per_step": ms,
        "attn_ms_cuda_graph": graph_ms,  # the same step replayed from a CUDA graph: no launch overhead
        "kv_bytes_per_token": bytes_per_token,
        "kv_bytes_ratio_to_bf16": bytes_per_token / dense_bytes_per_token,
        "bandwidth_fraction": read / (ms / 1e3) / peak,
        "kernel_bandwidth_fraction": None if graph_ms is None else read / (graph_ms / 1e3) / peak,
    }


def pack_rows(batch: int = 8, context: int = 32768) -> list[dict[str, Any]]:
    """Quantize-and-pack of one layer's prefill, per stream: the torch quantizer against the kernel.

    The kernel must store the same codes, scales and zeros (checked here too); its time is what a
    prefill spends storing the cache.
    """
    from transformers_headq.kernels import group_quantize

    keys = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    keys = keys * torch.linspace(0.3, 4.0, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    streams = {
        "keys": (HEADQ.key_quantizer(HEAD_DIM), keys),
        "values": (HEADQ.value_quantizer(HEAD_DIM), torch.randn_like(keys)),
        "side codes": (HEADQ.side_quantizer(HEADQ.rank or 0), torch.randn(*keys.shape[:3], 16, device="cuda")),
    }
    rows = []
    for name, (quantizer, x) in streams.items():
        assert quantizer is not None
        fast, oracle = group_quantize(quantizer, x), quantizer.quantize(x)
        same = all(torch.equal(getattr(fast, f), getattr(oracle, f)) for f in ("codes", "scale", "zero"))
        torch_ms = bench(lambda q=quantizer, x=x: q.quantize(x))
        kernel_ms = bench(lambda q=quantizer, x=x: group_quantize(q, x))
        rows.append({"stream": name, "tokens": batch * context, "torch_ms": torch_ms, "kernel_ms": kernel_ms,
                     "identical": same})  # fmt: skip
        print(f"pack {name:10s}: torch {torch_ms:.3f} ms, kernel {kernel_ms:.3f} ms, identical {same}", flush=True)
    return rows


def e2e_rows(batch: int, context: int, steps: int = 64, profile: Path | None = None) -> list[dict[str, Any]]:
    """Whole-model decode steps (random Llama-3-8B shapes, bf16) with each cache: the mean of ``steps``.

    64 steps span one quantization block, so HeadQ's block flush (once every 64 tokens) is in the mean; the
    warm-up reaches past HeadQ's first flush (``transformers_headq.speed.measure_decode_speed``, which also
    takes the GPU's busy time in one step: eager transformers launches each step's kernels from Python, so
    where the host is slower than the GPU the wall time is the host's, and the busy time says what the step
    costs the device).

    With ``profile``, one more step per cache runs under the torch profiler; its top operators by CPU and
    by GPU time are appended to that file (where a step's time goes: kernels, or Python and launches).
    """
    from transformers import DynamicCache

    from transformers_headq import enable_headq_attention
    from transformers_headq.speed import measure_decode_speed

    model = llama_3_8b_model()
    rows = []
    for cache_kind in ("dynamic-bf16", "dynamic-bf16-flash", "headq"):
        if cache_kind == "headq":
            enable_headq_attention(model)
            make = functools.partial(HeadQCache, random_basis(HEADQ.rank or 0), HEADQ)
        else:
            model.set_attn_implementation("sdpa")
            make = DynamicCache
        write_profile = None if profile is None else functools.partial(_write_profile, profile, cache_kind, batch)
        try:
            speed = measure_decode_speed(
                model, make, cache_kind, batch=batch, context=context, steps=steps, warmup=HEADQ.block_size + 2,
                sdpa_flash=cache_kind.endswith("-flash"), profile=write_profile,
            )  # fmt: skip
        except RuntimeError as error:  # e.g. no flash kernel for these shapes on this GPU
            print(f"e2e {cache_kind} T={context} B={batch}: {error}", flush=True)
            continue
        print(f"e2e {cache_kind:18s} T={context} B={batch}: {speed.ms_per_step:.1f} ms/step, "
              f"GPU busy {speed.gpu_busy_ms:.1f} ms", flush=True)  # fmt: skip
        rows.append(
            {
                "cache": cache_kind,
                "context": context,
                "batch": batch,
                "decode_ms_per_step": speed.ms_per_step,
                "decode_ms_median": speed.ms_median,
                "slowest_warmup_step_ms": speed.slowest_warmup_ms,
                "decode_tokens_per_s": speed.tokens_per_s,
                "gpu_busy_ms_per_step": speed.gpu_busy_ms,
                "peak_gib": speed.peak_gib,
            }
        )
    return rows


def _write_profile(path: Path, cache_kind: str, batch: int, step) -> None:  # type: ignore[no-untyped-def]
    """Append one profiled step's top operators (torch profiler) and Python functions (cProfile) to ``path``."""
    with torch.profiler.profile() as prof:
        step()
    table = prof.key_averages()
    python = cProfile.Profile()  # where the host time of a step goes, by Python function
    python.enable()
    step()
    python.disable()
    functions = io.StringIO()
    pstats.Stats(python, stream=functions).sort_stats("tottime").print_stats(25)
    with path.open("a") as f:
        f.write(f"# {cache_kind} B={batch}\n")
        f.write(functions.getvalue() + "\n")
        f.write(table.table(sort_by="self_cpu_time_total", row_limit=20) + "\n")
        f.write(table.table(sort_by="self_device_time_total", row_limit=20) + "\n")


def llama_3_8b_model(device: str = "cuda"):  # type: ignore[no-untyped-def]
    """A Llama-3-8B-shaped model with random bf16 weights on ``device`` (timing needs no trained weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=LAYERS, num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=128256, max_position_embeddings=131072,
    )  # fmt: skip
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def filled_model_cache(model, cache_kind: str, batch: int, context: int) -> Any:  # type: ignore[no-untyped-def]
    """A cache of ``context`` random tokens a sequence for every layer, with ``model`` set to its attention."""
    from transformers import DynamicCache

    from transformers_headq import enable_headq_attention

    if cache_kind == "headq":  # dynamic-bf16 and dynamic-bf16-flash: DynamicCache with sdpa
        enable_headq_attention(model)
        cache = HeadQCache(random_basis(HEADQ.rank or 0), HEADQ)
        for layer in cache.layers:
            fill_headq_layer(layer, batch, context)
        return cache
    model.set_attn_implementation("sdpa")
    dynamic = DynamicCache()
    for i in range(LAYERS):
        k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        dynamic.update(k, torch.randn_like(k), i)
    return dynamic


def fits(bytes_per_token: float, budget_gib: float) -> int:
    """Largest batch x context (tokens) of KV cache for all layers within ``budget_gib``."""
    return int(budget_gib * 2**30 / (bytes_per_token * LAYERS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="4096,16384,32768,65536,131072")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--caches", default="dynamic-bf16,dynamic-bf16-flash,headq,quanto")
    parser.add_argument("--check", action="store_true", help="compare the kernel with the torch path first")
    parser.add_argument("--e2e", default="32768x8", help="CONTEXTxBATCH pairs for whole-model decode, ',' separated")
    parser.add_argument("--budget-gib", type=float, default=40.0)
    parser.add_argument("--profile", type=Path, help="append a torch profile of one e2e step per cache here")
    parser.add_argument("--plot", type=Path, help="also draw the attention rows here (PNG)")
    parser.add_argument("--launch", type=Path, help="kernel launch settings (JSON, as kernel_tuning.py --dump writes)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, required=True)
    args = parser.parse_args()

    gpu = torch.cuda.get_device_name()
    if args.launch:
        LAUNCH.update(json.loads(args.launch.read_text()))
    print(f"kernel launch settings: {LAUNCH}", flush=True)
    checks = check() if args.check else []
    packs = pack_rows()
    copy = copy_bandwidth()
    peak = DATASHEET_BANDWIDTH.get(next((k for k in DATASHEET_BANDWIDTH if k in gpu), ""), copy)
    print(f"{gpu}: device-to-device copy {copy / 1e12:.2f} TB/s, peak taken as {peak / 1e12:.2f} TB/s", flush=True)
    rows = []
    for context in map(int, filter(None, args.contexts.split(","))):
        for batch in map(int, args.batches.split(",")):
            dense_gib = 2 * batch * context * KV_HEADS * HEAD_DIM * 2 / 2**30
            for cache in args.caches.split(","):
                if dense_gib * (3 if cache == "quanto" else 1.2) > 60:
                    continue  # one layer's dense states (quanto: plus its dequantized copies) must fit
                try:
                    row = attention_row(cache, batch, context, peak)
                except torch.OutOfMemoryError:
                    print(f"{cache} T={context} B={batch}: out of memory", flush=True)
                    continue
                except RuntimeError as error:  # e.g. no flash kernel for these shapes on this GPU
                    print(f"{cache} T={context} B={batch}: {error}", flush=True)
                    continue
                finally:
                    torch.cuda.empty_cache()
                row["gpu"] = gpu
                row["fits_tokens_in_budget"] = fits(row["kv_bytes_per_token"], args.budget_gib)
                row["budget_gib"] = args.budget_gib
                rows.append(row)
                graph = f" (graph {row['attn_ms_cuda_graph']:.3f})" if row["attn_ms_cuda_graph"] else ""
                print(
                    f"attn {cache:13s} T={context:6d} B={batch:2d}: {row['attn_ms_per_step']:.3f} ms{graph}, "
                    f"{row['kv_bytes_per_token']:.0f} B/token, {100 * row['bandwidth_fraction']:.0f}% of copy BW",
                    flush=True,
                )
    e2e = []
    for pair in filter(None, args.e2e.split(",")):
        context, batch = map(int, pair.split("x"))
        e2e += [{**r, "gpu": gpu} for r in e2e_rows(batch, context, profile=args.profile)]
    for r in rows:  # end-to-end tokens/s where measured for this (cache, context, batch)
        key = (r["cache"], r["context"], r["batch"])
        match = next((e for e in e2e if (e["cache"], e["context"], e["batch"]) == key), None)
        r["decode_tokens_per_s"] = None if match is None else match["decode_tokens_per_s"]
    results = {"attention": rows, "e2e": e2e, "pack": packs, "checks": checks, "copy_bandwidth": peak}
    results["launch"] = LAUNCH
    args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        from plot_decode import plot

        plot(results, args.plot)
    text = markdown(rows, e2e, packs, checks, gpu, peak, args.budget_gib)
    args.markdown.write_text(text + "\n")
    print(text)


def markdown(rows, e2e, packs, checks, gpu, peak, budget) -> str:  # type: ignore[no-untyped-def]
    lines = [f"GPU: {gpu}; peak bandwidth {peak / 1e12:.2f} TB/s; torch {torch.__version__}"]
    lines += [f"HeadQ kernel launch settings: {LAUNCH}", ""]
    columns = ["cache", "context", "batch", "attn ms/step", "vs bf16 sdpa", "vs bf16 flash", "graph ms"]
    columns += ["KV bytes/token", "vs bf16"]
    columns += ["BW share", "kernel BW share", f"fits in {budget:.0f} GiB"]
    lines += ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for r in rows:
        same = [b for b in rows if (b["context"], b["batch"]) == (r["context"], r["batch"])]
        speed, flash_speed = (
            next((f"{b['attn_ms_per_step'] / r['attn_ms_per_step']:.2f}x" for b in same if b["cache"] == name), "-")
            for name in ("dynamic-bf16", "dynamic-bf16-flash")
        )
        graph = "-" if r["attn_ms_cuda_graph"] is None else f"{r['attn_ms_cuda_graph']:.3f}"
        kernel_bw = "-" if r["kernel_bandwidth_fraction"] is None else f"{100 * r['kernel_bandwidth_fraction']:.0f}%"
        lines.append(
            f"| {r['cache']} | {r['context']} | {r['batch']} | {r['attn_ms_per_step']:.3f} | {speed} | {flash_speed} | "
            f"{graph} | "
            f"{r['kv_bytes_per_token']:.0f} | {r['kv_bytes_ratio_to_bf16']:.3f} | "
            f"{100 * r['bandwidth_fraction']:.0f}% | {kernel_bw} | "
            f"{fits(r['kv_bytes_per_token'], budget) / 1e6:.2f} M tokens |"
        )
    if e2e:
        lines += [
            "",
            "| cache | context | batch | decode ms/step | median ms | tokens/s | vs dynamic | vs dynamic flash "
            "| GPU busy ms/step | vs dynamic | peak GiB | slowest warm-up step ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in e2e:
            same = [b for b in e2e if (b["context"], b["batch"]) == (r["context"], r["batch"])]
            base = next(b for b in same if b["cache"] == "dynamic-bf16")
            flash = next((b for b in same if b["cache"] == "dynamic-bf16-flash"), None)
            vs_flash = "-" if flash is None else f"{r['decode_tokens_per_s'] / flash['decode_tokens_per_s']:.2f}x"
            lines.append(
                f"| {r['cache']} | {r['context']} | {r['batch']} | {r['decode_ms_per_step']:.1f} | "
                f"{r['decode_ms_median']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x | {vs_flash} | "
                f"{r['gpu_busy_ms_per_step']:.1f} | {base['gpu_busy_ms_per_step'] / r['gpu_busy_ms_per_step']:.2f}x | "
                f"{r['peak_gib']:.1f} | {r['slowest_warmup_step_ms']:.0f} |"
            )
    if packs:
        lines += ["", "| quantize and pack (one layer) | tokens | torch ms | kernel ms | speed-up | identical |"]
        lines += ["|---|---:|---:|---:|---:|---|"]
        for r in packs:
            lines.append(
                f"| {r['stream']} | {r['tokens']} | {r['torch_ms']:.3f} | {r['kernel_ms']:.3f} | "
                f"{r['torch_ms'] / r['kernel_ms']:.1f}x | {'yes' if r['identical'] else 'NO'} |"
            )
    for dtype in sorted({c["dtype"] for c in checks}):
        worst = max(c["rel_error"] for c in checks if c["dtype"] == dtype)
        tolerance = CHECK_TOLERANCE[getattr(torch, dtype)]
        lines += ["", f"Kernel vs float32 torch reference, {dtype} cache: largest relative error {worst:.2e} "
                  f"(tolerance {tolerance:g})."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
