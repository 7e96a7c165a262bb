"""Plot the decode benchmark's JSON: attention time per step and achieved bandwidth, per cache.

    python benchmarks/plot_decode.py benchmarks/decode-bench.json benchmarks/decode-bench.png

``decode_bench.py --plot PATH`` calls this after a run; this script redraws a saved run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

STYLE = {
    "dynamic-bf16": ("tab:gray", "o"),
    "dynamic-bf16-flash": ("tab:green", "D"),
    "headq": ("tab:blue", "s"),
    "quanto": ("tab:red", "^"),
}


def plot(results: dict[str, Any], path: Path) -> None:
    """Two panels over context length, one line per (cache, batch): ms per step (log) and bandwidth share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["attention"]
    fig, (time_ax, bw_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for cache in sorted({r["cache"] for r in rows}):
        color, marker = STYLE.get(cache, ("black", "x"))
        for i, batch in enumerate(sorted({r["batch"] for r in rows})):
            line = sorted((r for r in rows if r["cache"] == cache and r["batch"] == batch), key=lambda r: r["context"])
            if not line:
                continue
            contexts = [r["context"] for r in line]
            style = dict(color=color, marker=marker, linestyle=["-", "--", ":"][i % 3], label=f"{cache}, batch {batch}")
            time_ax.plot(contexts, [r["attn_ms_per_step"] for r in line], **style)
            bw_ax.plot(contexts, [100 * r["bandwidth_fraction"] for r in line], **style)
    for ax in (time_ax, bw_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    time_ax.set_yscale("log")
    time_ax.set_ylabel("decode attention per layer and step (ms)")
    bw_ax.set_ylabel("bytes read / time, % of peak bandwidth")
    gpu = rows[0]["gpu"] if rows else ""
    fig.suptitle(f"Decode attention, Llama-3-8B shapes, {gpu}")
    bw_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path)
    parser.add_argument("png", type=Path)
    args = parser.parse_args()
    plot(json.loads(args.json.read_text()), args.png)


if __name__ == "__main__":
    main()
