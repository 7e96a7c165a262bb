"""The CUDA decode kernel (issue 16) against the torch reference, the Triton kernel and bf16 sdpa, on one GPU.

1. ``check``: the CUDA kernel's output against the float32 torch path (the oracle) and the Triton kernel,
   for bf16 and float16 caches, with and without side code, sinks, a padding mask, soft-capping, blocks of
   64 and 128 tokens, one and several splits.
2. ``grid``: one layer's decode attention per step at Llama-3-8B shapes (32 query heads, 8 KV heads, head
   dim 128), eager and replayed from a CUDA graph: bf16 sdpa (flash, and torch's default), HeadQ's Triton
   kernel (``HEADQ_CUDA_DECODE=0``), HeadQ's CUDA kernel; ratios to the best sdpa row of the same run, and
   the share of the H200's 4.8 TB/s on the bytes each must read.

    cd benchmarks && python cuda_decode_bench.py --json decode-cuda-h200.json --markdown decode-cuda-h200.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch
import torch.nn.functional as F
from decode_bench import (
    DATASHEET_BANDWIDTH,
    HEAD_DIM,
    HEADQ,
    KV_HEADS,
    Q_HEADS,
    _graph_ms,
    _Module,
    bench,
    fill_headq_layer,
    host_us,
    random_basis,
)

from transformers_headq import HeadQCache
from transformers_headq.attention import headq_attention_forward
from transformers_headq.fused_decode import fused_decode_attention
from transformers_headq.kernels import cuda_decode
from transformers_headq.speed import sdpa_backend

CUDA_CALLS = {"n": 0}
_store_launch = cuda_decode.store_launch


def _counted_store_launch(*args: Any, **kwargs: Any) -> Callable[..., torch.Tensor | None] | None:
    """``cuda_decode.store_launch`` whose launches count their runs: the check's way to know that the CUDA kernel
    ran, not a fallback (used in the check only: not in timed calls)."""
    made = _store_launch(*args, **kwargs)
    if made is None:
        return None

    def step(*step_args: Any) -> torch.Tensor | None:
        out = made(*step_args)
        CUDA_CALLS["n"] += out is not None  # None: the step's tensors did not fit, the Triton kernel ran
        return out  # type: ignore[no-any-return]

    return step


def check(contexts=(200, 1000, 4100), batches=(1, 3), only: str = "") -> list[dict[str, Any]]:
    """Each case's three paths, synchronised one by one (so that a fault names its path)."""
    configs = {
        "K2 r16 s4/block V2 sink1": HEADQ,
        "K2 no side V2 sink1": HEADQ.replace(rank=0),
        "K2 r16 s4/block V2 sink4": HEADQ.replace(sink_keys=4),
        "K2 r16 s4/block V2 nosink b128": HEADQ.replace(sink_keys=0, block_size=128),
    }
    rows = []
    basis = random_basis(16)
    module = _Module()
    for dtype in (torch.bfloat16, torch.float16):
        for name, config in configs.items():
            if only not in name:
                continue
            for context in contexts:
                for batch in batches:
                    for variant in ("plain", "mask", "softcap"):
                        layer = HeadQCache(basis, config).layers[0]
                        fill_headq_layer(layer, batch, context, dtype=dtype)
                        q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=dtype)
                        new = [torch.randn(batch, KV_HEADS, 1, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(2)]
                        k, v = layer.update(*new)
                        mask, softcap = None, None
                        if variant == "mask":  # padding on the left of every other sequence
                            mask = torch.ones(batch, 1, 1, layer.stored_length, device="cuda", dtype=torch.bool)
                            mask[::2, ..., :37] = False
                        if variant == "softcap":
                            softcap = 5.0
                        calls = CUDA_CALLS["n"]
                        with patch.object(cuda_decode, "store_launch", _counted_store_launch):
                            fused = fused_decode_attention(layer, q, mask, HEAD_DIM**-0.5, softcap)
                        took_cuda = CUDA_CALLS["n"] > calls
                        torch.cuda.synchronize()
                        triton = None
                        if config.block_size == 64:  # the Triton kernel faults on blocks of 128 (misaligned)
                            with patch.dict(os.environ, {"HEADQ_CUDA_DECODE": "0"}):
                                triton = fused_decode_attention(layer, q, mask, HEAD_DIM**-0.5, softcap)
                            torch.cuda.synchronize()
                        with patch.dict(os.environ, {"HEADQ_KERNELS": "0"}):
                            reference, _ = headq_attention_forward(module, q.float(), k, v, mask, softcap=softcap)
                        assert fused is not None
                        ref = reference.float()
                        err = ((fused.float() - ref).norm() / ref.norm()).item()
                        err_triton = None if triton is None else ((triton.float() - ref).norm() / ref.norm()).item()
                        dt = str(dtype).removeprefix("torch.")
                        row = {"config": name, "dtype": dt, "context": context, "batch": batch, "variant": variant,
                               "cuda_kernel": took_cuda, "rel_error": err, "rel_error_triton": err_triton}  # fmt: skip
                        rows.append(row)
                        print(
                            f"check {name:32s} {dt:8s} T={context:5d} B={batch} {variant:7s} cuda={took_cuda}: "
                            f"rel error {err:.2e} (triton {err_triton if err_triton is None else f'{err_triton:.2e}'})",
                            flush=True,
                        )
    return rows


def _times(fn: Callable[[], Any]) -> dict[str, float]:
    """A row's timings of ``fn``: eager and graph-replayed ms, and host us a call."""
    return {"attn_ms_per_step": bench(fn), "attn_ms_cuda_graph": _graph_ms(fn), "host_us_per_call": host_us(fn)}


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flash: bool) -> Callable[[], torch.Tensor]:
    """bf16 sdpa (flash forced, or the backend torch picks), as a model's attention calls it."""

    def sdpa() -> torch.Tensor:
        with sdpa_backend(flash):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return sdpa


CACHES = ("dynamic-bf16-flash", "dynamic-bf16", "headq-triton", "headq-cuda")


def grid_rows(
    context: int, batch: int, gpu: str, peak: float, caches: tuple[str, ...] = CACHES
) -> list[dict[str, Any]]:
    """One grid point's rows for ``caches`` (ratios to sdpa only where an sdpa row ran)."""
    rows = []
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    dense_read = 2 * k.numel() * 2
    for name, flash in (("dynamic-bf16-flash", True), ("dynamic-bf16", False)):
        if name not in caches:
            continue
        rows.append({"cache": name, "context": context, "batch": batch, **_times(_sdpa(q, k, v, flash)),
                     "read_bytes": dense_read})  # fmt: skip
    del k, v
    torch.cuda.empty_cache()
    layer = HeadQCache(random_basis(HEADQ.rank or 0), HEADQ).layers[0]
    fill_headq_layer(layer, batch, context)
    read = layer.key_nbytes() + layer.value_nbytes()

    def step() -> torch.Tensor | None:
        return fused_decode_attention(layer, q, None, HEAD_DIM**-0.5, None)

    for name, env in (("headq-triton", "0"), ("headq-cuda", "1")):
        if name not in caches:
            continue
        with patch.dict(os.environ, {"HEADQ_CUDA_DECODE": env}):
            times = _times(step)
        rows.append({"cache": name, "context": context, "batch": batch, **times, "read_bytes": read})
    sdpa = [r for r in rows if r["cache"].startswith("dynamic")]
    best_sdpa = min((r["attn_ms_per_step"] for r in sdpa), default=float("nan"))
    best_sdpa_graph = min((r["attn_ms_cuda_graph"] for r in sdpa), default=float("nan"))
    for r in rows:
        r["gpu"] = gpu
        r["speedup_vs_best_sdpa"] = best_sdpa / r["attn_ms_per_step"]
        r["speedup_vs_best_sdpa_graph"] = best_sdpa_graph / r["attn_ms_cuda_graph"]
        r["bandwidth_fraction"] = r["read_bytes"] / (r["attn_ms_per_step"] / 1e3) / peak
        r["bandwidth_fraction_graph"] = r["read_bytes"] / (r["attn_ms_cuda_graph"] / 1e3) / peak
        print(
            f"{r['cache']:20s} T={context:6d} B={batch:2d}: {r['attn_ms_per_step']:.4f} ms "
            f"(graph {r['attn_ms_cuda_graph']:.4f}), x{r['speedup_vs_best_sdpa']:.2f} "
            f"(graph x{r['speedup_vs_best_sdpa_graph']:.2f}), {100 * r['bandwidth_fraction_graph']:.0f}% of peak, "
            f"host {r['host_us_per_call']:.1f} us a call",
            flush=True,
        )
    return rows


def markdown(
    rows: list[dict[str, Any]], checks: list[dict[str, Any]], gpu: str, command: str, commit: str | None = None
) -> str:
    made_at = f" at commit {commit}" if commit else ""
    lines = [
        "# CUDA decode kernel: one layer's decode attention (issue 16)", "",
        f"Made{made_at} on one {gpu} ({torch.__version__}) by", "", f"    {command}", "",
        "Llama-3-8B shapes (32 query heads, 8 KV heads, head dim 128), random bf16 states; HeadQ: the library's",
        "defaults (2-bit keys on blocks of 64, rank-16 side code of 4 bits with block scales, 2-bit values, one",
        "exact sink key). Median ms of CUDA-event timings by `triton.testing.do_bench`, launched eagerly from",
        "Python ('ms') and replayed from a CUDA graph ('graph ms'). do_bench clears the L2 cache (a 256 MB memset)",
        "before each call, so host time up to about that memset's length hides behind it, as it does behind the",
        "rest of a model's layer; 'host us': the host time a call takes to return, measured apart. 'x sdpa': the",
        "best of the two sdpa rows of the same run over this row; 'BW': bytes it must read over its graph time,",
        "against 4.8 TB/s.", "",
        "| cache | context | batch | ms | graph ms | host us | x sdpa | x sdpa (graph) | BW (graph) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['cache']} | {r['context']} | {r['batch']} | {r['attn_ms_per_step']:.4f} | "
            f"{r['attn_ms_cuda_graph']:.4f} | {r['host_us_per_call']:.1f} | {r['speedup_vs_best_sdpa']:.2f}x | "
            f"{r['speedup_vs_best_sdpa_graph']:.2f}x | {100 * r['bandwidth_fraction_graph']:.0f}% |"
        )
    if checks:
        worst = max(c["rel_error"] for c in checks)
        worst_triton = max(c["rel_error_triton"] for c in checks if c["rel_error_triton"] is not None)
        taken = sum(c["cuda_kernel"] for c in checks)
        lines += ["", f"Check: {len(checks)} cases, the CUDA kernel ran in {taken}; largest relative error against",
                  f"the float32 torch path {worst:.2e} (the Triton kernel: {worst_triton:.2e})."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="4096,32768,131072")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--check-only", default="", help="check only the configurations whose name holds this")
    parser.add_argument("--caches", default=",".join(CACHES), help="grid rows to time (sdpa rows give the ratios)")
    parser.add_argument("--launch", help="CUDA kernel launch settings as JSON (cuda_decode.LAUNCH keys)")
    parser.add_argument(
        "--sources",
        type=Path,
        help="build the CUDA kernel from this folder (binding.cpp, decode.cu, "
        "decode.h) instead of the package's: to A/B a variant (give it its own TORCH_EXTENSIONS_DIR)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="time under torch.use_deterministic_algorithms(True): the kernel deals each split's tiles to its warps "
        "instead of letting them claim tiles at run time",
    )
    parser.add_argument("--commit", help="the commit the run is made at, for the markdown (a device copy has no git)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.sources:
        cuda_decode.SOURCES = args.sources.resolve()
    if args.launch:
        cuda_decode.LAUNCH.update(json.loads(args.launch))
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)
    gpu = torch.cuda.get_device_name()
    peak = DATASHEET_BANDWIDTH.get(next((k for k in DATASHEET_BANDWIDTH if k in gpu), ""), 4.8e12)
    assert cuda_decode.extension() is not None, "the CUDA kernel did not build"
    checks = [] if args.no_check else check(only=args.check_only)
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {"gpu": gpu, "commit": args.commit, "launch": cuda_decode.LAUNCH,
                               "deterministic": args.deterministic, "checks": checks, "attention": rows}  # fmt: skip
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            rows += grid_rows(context, batch, gpu, peak, tuple(args.caches.split(",")))
            torch.cuda.empty_cache()
            args.json.write_text(json.dumps(results, indent=2))  # written as rows come
    command = "python cuda_decode_bench.py " + " ".join(sys.argv[1:])
    if args.markdown:
        args.markdown.write_text(markdown(rows, checks, gpu, command, args.commit) + "\n")


if __name__ == "__main__":
    main()
