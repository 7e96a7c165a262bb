"""Where one launch of the CUDA decode kernel spends its time: every warp's phase stamps (a HEADQ_TIMELINE build).

For each ``context x batch`` point at Llama-3-8B shapes (the library's default HeadQ settings): the graph-replayed
time of the plain build and of the stamping build (what the stamps cost), then one launch of the stamping build
after an L2 flush, and over its warps: when each starts (the launch's ramp), how long its prologue, tile loop,
window, combine and the merge take, and when the last one ends. Starts come from ``%globaltimer`` (comparable across
SMs); phase lengths from ``%clock64`` (cycles of the warp's SM), turned into ns by the ratio of the two over the
warps' whole spans.

    cd benchmarks && python cuda_decode_timeline.py --points 32768x8,131072x8,32768x1 \
        --json records/cuda-decode-timeline-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from decode_bench import HEAD_DIM, HEADQ, KV_HEADS, Q_HEADS, _graph_ms, fill_headq_layer, random_basis

from transformers_headq import HeadQCache
from transformers_headq.kernels import cuda_decode

# A phase: from decode.cu's HEADQ_STAMP k to stamp k + 1; the last two only in the splits that merged.
PHASES = {
    "rows": 0, "first copies": 1, "query": 2, "qW": 3, "to loop": 4, "tile loop": 5, "window": 6, "combine": 7,
    "count": 8, "merge": 9,
}  # fmt: skip
STAMPS = 32  # a warp's slots (decode.cu): globaltimer ns of stamp k in k, its SM in 15, clock64 in 16 + k
MERGING_PHASES = ("count", "merge")
WARPS = 4


def _percentiles(x: torch.Tensor) -> dict[str, float]:
    values = torch.quantile(x.double(), torch.tensor([0.0, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
    return dict(zip(("min", "median", "p90", "max"), values, strict=True))


def point(context: int, batch: int, raw: bool = False) -> dict[str, Any]:
    """One point's graph times (plain, stamping) and phase summary of one stamped launch; ``raw``: every warp's SM and
    stamps too (which SMs run late)."""
    layer = HeadQCache(random_basis(HEADQ.rank or 0), HEADQ).layers[0]
    fill_headq_layer(layer, batch, context)
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    keys, side, values = layer.key_store.packed(), layer.side_store.packed(), layer.value_store.packed()
    stores = (q, layer.decoder, keys, side, values, layer.sink_keys, HEADQ.block_size)
    plain, stamped = cuda_decode.store_launch(*stores), cuda_decode.store_launch(*stores, timeline=True)
    assert plain is not None and stamped is not None, "the CUDA kernel does not take these stores"
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    n_splits, per_split = cuda_decode.splits(batch * KV_HEADS, keys.codes.shape[2], sms)
    stamps = torch.zeros(n_splits, batch * KV_HEADS, WARPS, STAMPS, dtype=torch.int64, device="cuda")
    stamped.record_timeline(stamps)
    step_args = (q, layer.window_keys, layer.window_values, None, HEAD_DIM**-0.5, 0.0)
    graph_plain, graph_stamped = _graph_ms(lambda: plain(*step_args)), _graph_ms(lambda: stamped(*step_args))

    flush = torch.empty(256 * 1024**2, dtype=torch.uint8, device="cuda")
    stamps.zero_()
    flush.zero_()
    torch.cuda.synchronize()
    stamped(*step_args)
    torch.cuda.synchronize()
    s = stamps.cpu().reshape(-1, STAMPS)
    ns, cycles, sm = s[:, :15], s[:, 16:31], s[:, 15]
    merged = ns[:, 9] > 0  # the warps of the splits that merged
    span_ns = torch.where(merged, ns[:, 10], ns[:, 8]) - ns[:, 0]
    span_cycles = torch.where(merged, cycles[:, 10], cycles[:, 8]) - cycles[:, 0]
    ns_per_cycle = float(span_ns.sum() / span_cycles.sum())
    first = int(ns[:, 0].min())
    end = torch.where(merged, ns[:, 10], ns[:, 8])
    phases = {}
    for name, k in PHASES.items():
        rows = merged if name in MERGING_PHASES else torch.ones_like(merged)
        if rows.any():
            phases[name] = _percentiles((cycles[rows, k + 1] - cycles[rows, k]) * ns_per_cycle)
    block_start = ns[:, 0].reshape(-1, WARPS).min(1).values - first
    loop_end = ns[:, 6] - first
    result = {
        "context": context, "batch": batch, "splits": n_splits, "tiles_per_split": per_split // 64,
        "blocks": n_splits * batch * KV_HEADS, "sms_used": int(sm.unique().numel()),
        "graph_ms": graph_plain, "graph_ms_stamped": graph_stamped,
        "launch_span_us": float(end.max() - first) / 1e3, "ns_per_cycle": ns_per_cycle,
        "block_start_us": {k: v / 1e3 for k, v in _percentiles(block_start).items()},
        "loop_end_us": {k: v / 1e3 for k, v in _percentiles(loop_end).items()},
        "end_us": {k: v / 1e3 for k, v in _percentiles(end - first).items()},
        "phase_us": {name: {k: v / 1e3 for k, v in p.items()} for name, p in phases.items()},
        "globaltimer_step_ns": int(torch.diff(ns[:, 0].unique()).min()) if ns[:, 0].unique().numel() > 1 else 0,
    }  # fmt: skip
    if raw:  # per warp, in launch order (split, sequence x KV head, warp): its SM and stamps in ns from the first
        taken = torch.where(ns > 0, ns - first, torch.full_like(ns, -1))
        result["warps"] = {"sm": sm.tolist(), "stamps_ns": taken.tolist()}
    return result


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"# Where a CUDA decode launch spends its time ({torch.cuda.get_device_name()}, torch {torch.__version__})",
        "", f"    {command}", "",
        "One launch of the stamping build (HEADQ_TIMELINE) after an L2 flush; us from the first warp's start.",
        "Phases, us: median / max over the warps (count and merge: the merging splits' warps only).", "",
        "| point | splits x tiles | graph ms (stamped) | span us | block starts med / max | loop ends min / med / max "
        "| last end | " + " | ".join(PHASES) + " |",
        "|---|---|---|---:|---|---|---:|" + "---|" * len(PHASES),
    ]  # fmt: skip
    for r in rows:
        ph = r["phase_us"]
        cells = [f"{ph[name]['median']:.2f} / {ph[name]['max']:.2f}" if name in ph else "-" for name in PHASES]
        lines.append(
            f"| {r['context']} x {r['batch']} | {r['splits']} x {r['tiles_per_split']} | {r['graph_ms']:.4f} "
            f"({r['graph_ms_stamped']:.4f}) | {r['launch_span_us']:.1f} | {r['block_start_us']['median']:.2f} / "
            f"{r['block_start_us']['max']:.2f} | {r['loop_end_us']['min']:.1f} / {r['loop_end_us']['median']:.1f} / "
            f"{r['loop_end_us']['max']:.1f} | {r['end_us']['max']:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="32768x8,131072x8,32768x1,4096x1")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--raw", action="store_true", help="keep every warp's SM and stamps in the JSON")
    args = parser.parse_args()
    rows = []
    for spec in args.points.split(","):
        context, batch = map(int, spec.split("x"))
        rows.append(point(context, batch, args.raw))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "warps"}), flush=True)
        args.json.write_text(json.dumps(rows, indent=2))  # written as points come
        torch.cuda.empty_cache()
    if args.markdown:
        args.markdown.write_text(markdown(rows, "python cuda_decode_timeline.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
