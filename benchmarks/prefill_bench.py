"""Prefill (time to first token) on the GPU: HeadQ's multi-token attention through sdpa over effective
keys, against its float32 reference walk and against a bf16 DynamicCache, Llama-3-8B shapes with random
bf16 weights.

Each ``--run CACHE@CONTEXTxBATCH`` row runs one forward over a random prompt into a fresh cache
(``dynamic``: DynamicCache with sdpa; ``headq``: HeadQ, multi-token calls through sdpa; ``headq-reference``:
HeadQ with the reference walk) three times after a warm-up and records the median wall time (each forward
waited for) and the peak memory. Rows are written to ``--json`` as they finish; a row that does not fit
the GPU is recorded as skipped.

    python benchmarks/prefill_bench.py --json benchmarks/prefill-h200.json \\
        --run dynamic@8192x1,headq@8192x1,headq-reference@8192x1,dynamic@32768x1,headq@32768x1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from decode_bench import HEADQ, llama_3_8b_model, random_basis
from decode_e2e import parse_runs
from transformers import DynamicCache

from transformers_headq import HeadQCacheFactory, attention, enable_headq_attention


def time_prefill(model: Any, make_cache: Any, context: int, batch: int, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of one prefill forward, and the peak GiB over the runs."""
    ids = torch.randint(0, 128256, (batch, context), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 1):
        cache = make_cache()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        if i:  # the first run warms up (allocator, kernels)
            times.append(time.perf_counter() - start)
        del cache
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="CACHE@CONTEXTxBATCH rows, ',' separated")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    model = llama_3_8b_model()
    factory = HeadQCacheFactory(random_basis(HEADQ.rank or 0), HEADQ, model.config)
    import transformers

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    rows: list[dict[str, Any]] = []
    for cache, context, batch in parse_runs(args.run):
        row: dict[str, Any] = {"cache": cache, "context": context, "batch": batch, "gpu": torch.cuda.get_device_name()}
        if cache == "dynamic":
            model.set_attn_implementation("sdpa")
            make: Any = DynamicCache
        else:
            enable_headq_attention(model)
            attention.PREFILL_BY_SDPA = cache == "headq"
            make = factory
        try:
            seconds, peak = time_prefill(model, make, context, batch)
            row |= {"prefill_s": seconds, "prefill_tokens_per_s": context * batch / seconds, "peak_gib": peak}
        except torch.OutOfMemoryError as exc:
            row["skipped"] = f"out of memory: {str(exc).splitlines()[0]}"
        torch.cuda.empty_cache()
        attention.PREFILL_BY_SDPA = True
        rows.append(row | versions)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
