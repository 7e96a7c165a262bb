"""Where the host time of a whole-model decode step goes, for HeadQCache and DynamicCache (GPU).

Eager transformers launches every kernel of a decode step from Python, so with a fast GPU the step's
wall time is the host's. This script times, for each cache on the same random Llama-3-8B-shaped model
(bf16, caches filled with ``--context`` random tokens per sequence):

- the step's wall time and its host time (until the forward returns), mean and median of ``--steps``
  synchronised steps after a warm-up through HeadQ's first block flush; again with Python's garbage
  collector off; and the operations that synchronise with the GPU in a step (torch's sync debug mode);
- the host time spent inside the cache's ``update`` and inside the attention function (the time the
  Python call takes, not the GPU's: nothing synchronises inside a step), summed over the layers;
- for HeadQ, the host time per call of one layer's fused attention and of its pieces, outermost first, beside
  bf16 sdpa on the same shapes, and a profile of the call by Python function (``--pieces-only``: just these).

    python benchmarks/decode_host.py --context 32768 --batch 8 --markdown benchmarks/decode-host.md
    python benchmarks/decode_host.py --context 4096 --batch 1 --pieces-only
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import pstats
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from decode_bench import (  # noqa: I001 (a script beside it, not a package)
    HEAD_DIM,
    HEADQ,
    KV_HEADS,
    Q_HEADS,
    fill_headq_layer,
    filled_model_cache,
    host_us,
    llama_3_8b_model,
    random_basis,
)

import transformers_headq.fused_decode as fused_decode
from transformers_headq import HeadQCache

HOST: dict[str, float] = defaultdict(float)  # seconds of host time by part, reset per measured step


def _timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            HOST[part] += time.perf_counter() - started

    return wrapper


def _instrument(cache_kind: str) -> Callable[[], None]:
    """Wrap the cache's update and the attention function with host timers; return what undoes it."""
    from transformers import AttentionInterface
    from transformers.cache_utils import DynamicLayer

    from transformers_headq.attention import ATTENTION_NAME
    from transformers_headq.layer import HeadQLayer

    layer_type: Any = HeadQLayer if cache_kind == "headq" else DynamicLayer
    name = ATTENTION_NAME if cache_kind == "headq" else "sdpa"
    update, attention = layer_type.update, AttentionInterface._global_mapping[name]
    layer_type.update = _timed("cache update", update)
    AttentionInterface.register(name, _timed("attention", attention))

    def undo() -> None:
        layer_type.update = update
        AttentionInterface.register(name, attention)

    return undo


def _time_steps(step: Callable[[], Any], steps: int) -> dict[str, float]:
    """Wall and host (until the forward returns) milliseconds of synchronised steps, and timed parts (medians)."""
    walls, hosts, parts = [], [], defaultdict(list)
    for _ in range(steps):
        HOST.clear()
        torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        launched = time.perf_counter()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - started)
        hosts.append(launched - started)
        for part, seconds in HOST.items():
            parts[part].append(seconds)
    return {
        "wall_ms_mean": statistics.fmean(walls) * 1e3,
        "wall_ms_median": statistics.median(walls) * 1e3,
        "host_ms_median": statistics.median(hosts) * 1e3,
        **{f"{part} ms": statistics.median(v) * 1e3 for part, v in parts.items()},
    }


def _synchronising_calls(step: Callable[[], Any]) -> list[str]:
    """Warnings torch raises for operations that synchronise with the GPU during one step."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    messages = {str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message)}
    return sorted(m for m in messages if "prototype feature" not in m)  # not torch's one-time notice


def step_rows(batch: int, context: int, steps: int) -> list[dict[str, Any]]:
    """Per cache: plain steps, steps with Python's garbage collector off, steps with host timers on parts."""
    model = llama_3_8b_model()
    rows = []
    for cache_kind in ("dynamic-bf16", "headq"):
        cache = filled_model_cache(model, cache_kind, batch, context)
        token = torch.randint(0, 1000, (batch, 1), device="cuda")
        step = functools.partial(model, input_ids=token, past_key_values=cache, use_cache=True)
        with torch.no_grad():
            for _ in range(HEADQ.block_size + 2):  # through HeadQ's first block flush (its stores grow there)
                step()
            plain = _time_steps(step, steps)
            gc.disable()
            no_gc = _time_steps(step, steps)
            gc.enable()
            syncs = _synchronising_calls(step)
            undo = _instrument(cache_kind)
            timed = _time_steps(step, steps)
            undo()
        row = {
            "cache": cache_kind,
            **plain,
            "wall_ms_median_gc_off": no_gc["wall_ms_median"],
            **{k: v for k, v in timed.items() if k.endswith(" ms")},
            "synchronising calls": "; ".join(syncs) or "none",
        }
        print(row, flush=True)
        rows.append(row)
        del cache, step
        torch.cuda.empty_cache()
    return rows


def piece_rows(batch: int, context: int, calls: int = 200) -> list[tuple[str, float]]:
    """Host microseconds per call of one layer's fused decode attention and of its pieces, outermost first (no
    synchronisation: launches are queued), beside bf16 sdpa on the same shapes; then a profile by function."""
    from transformers_headq.kernels import cuda_decode, kernels_enabled, triton_decode_attention

    cache = HeadQCache(random_basis(HEADQ.rank or 0), HEADQ)
    layer = cache.layers[0]
    fill_headq_layer(layer, batch, context)
    layer.update(*(torch.randn(batch, KV_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in "kv"))
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    scaling = HEAD_DIM**-0.5
    key = torch.randn(batch, KV_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    dense = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    settings = fused_decode._settings(layer, Q_HEADS)
    assert settings is not None
    keys, side, values = layer.key_store.packed(), layer.side_store.packed(), layer.value_store.packed()
    stores = (q, layer.decoder, keys, side, values, layer.sink_keys, HEADQ.block_size)
    launch = cuda_decode.store_launch(*stores)
    assert launch is not None, "the CUDA kernel does not take these stores"
    window = (layer.window_keys, layer.window_values)
    pieces = [
        ("bf16 sdpa, same shapes (torch's default backend)",
         lambda: torch.nn.functional.scaled_dot_product_attention(q, dense, dense, enable_gqa=True)),
        ("fused_decode_attention (whole)", lambda: fused_decode.fused_decode_attention(layer, q, None, scaling, None)),
        ("a layer's kept StoreLaunch, one step", lambda: launch(q, *window, None, scaling, 0.0)),
        ("cuda_decode.store_launch (a new launch: once a layer and block)", lambda: cuda_decode.store_launch(*stores)),
        ("kernels.triton_decode_attention (the Triton kernels)",
         lambda: triton_decode_attention(settings, q, layer.decoder, keys, side, values, *window, None, scaling, None,
                                         layer.sink_keys)),
        ("torch.empty (the output's shape)", lambda: torch.empty(batch, 1, Q_HEADS, HEAD_DIM, device="cuda")),
        ("kernels_enabled", lambda: kernels_enabled(q.device)),
        ("cuda_decode.covers", lambda: cuda_decode.covers(settings, q, values)),
        ("key_store.packed()", layer.key_store.packed),
        ("torch.cat (window keys + 1 token)", lambda: torch.cat([layer.window_keys, key], dim=-2)),
    ]  # fmt: skip
    rows = [(name, host_us(fn, calls)) for name, fn in pieces]
    profile = cProfile.Profile()  # where the whole call's host time goes, by Python function
    profile.enable()
    for _ in range(calls):
        fused_decode.fused_decode_attention(layer, q, None, scaling, None)
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--pieces-only", action="store_true", help="only one layer's attention call and its pieces")
    args = parser.parse_args()
    pieces = piece_rows(args.batch, args.context)
    for name, us in pieces:
        print(f"{name}: {us:.1f} us", flush=True)
    if args.pieces_only:
        return
    rows = step_rows(args.batch, args.context, args.steps)
    if args.markdown:
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines = [
            f"Host time of a decode step, {torch.cuda.get_device_name()}, torch {torch.__version__}, context "
            f"{args.context}, batch {args.batch} (`python benchmarks/decode_host.py --context {args.context} "
            f"--batch {args.batch}`). Per-part times are medians over the steps of host time inside the call, "
            "summed over the layers.",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
        ]
        for row in rows:
            cells = (f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys)
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "| piece of one layer's fused attention | host us per call |", "|---|---:|"]
        lines += [f"| {name} | {us:.1f} |" for name, us in pieces]
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
