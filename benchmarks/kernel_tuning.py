"""Time the HeadQ split kernel at one shape under several launch settings; print registers and spills.

First register caps (``maxnreg``, 0: none) at the default setting, then the best one without the bit-trick
code conversion (``asm``), with other tiles, warps and programs per SM.
``--dump DIR`` writes the best setting's Triton IR, PTX and cubin there (for ``cuobjdump -sass``);
``--once`` runs the kernel a few times with a given setting and exits (for ``ncu``). bf16 sdpa on the
same shapes is timed in the same run as the reference.

python benchmarks/kernel_tuning.py --context 32768 --batches 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from decode_bench import HEAD_DIM, HEADQ, KV_HEADS, Q_HEADS, bench, fill_headq_layer, random_basis  # noqa: I001

import transformers_headq.fused_decode as fused_decode
import transformers_headq.kernels as kernels
from transformers_headq import HeadQCache

DEFAULT_LAUNCH = dict(kernels.LAUNCH)  # each sweep starts from the library's settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", default="8", help="batch sizes, ',' separated")
    parser.add_argument("--dump", type=Path, help="write the best setting's IR, PTX and cubin here")
    parser.add_argument("--once", action="store_true", help="run the kernel a few times (for a profiler) and exit")
    parser.add_argument("--setting", type=Path, help="with --once: a launch setting (JSON) written by --dump")
    args = parser.parse_args()
    for batch in [int(b) for b in args.batches.split(",")]:
        layer, q = setup(args.context, batch)
        if args.once:
            if args.setting:
                kernels.LAUNCH.update(json.loads(args.setting.read_text()))
            for _ in range(3):
                fused_decode.fused_decode_attention(layer, q, None, HEAD_DIM**-0.5, None)
            torch.cuda.synchronize()
            continue
        best = sweep(layer, q, args.context, batch)
        if args.dump:
            kernels.LAUNCH.update(best)
            fused_decode.fused_decode_attention(layer, q, None, HEAD_DIM**-0.5, None)
            dump(args.dump, kernels.last_compiled)
            (args.dump / "best.json").write_text(json.dumps(best))


def setup(context: int, batch: int):  # type: ignore[no-untyped-def]
    layer = HeadQCache(random_basis(HEADQ.rank or 0), HEADQ).layers[0]
    fill_headq_layer(layer, batch, context)
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return layer, q


def time_setting(layer, q, read: int, **setting: int) -> float:  # type: ignore[no-untyped-def]
    kernels.LAUNCH.update(setting)
    try:
        ms = bench(lambda: fused_decode.fused_decode_attention(layer, q, None, HEAD_DIM**-0.5, None))
    except Exception as err:  # a setting that does not compile or fit
        print(f"{setting}: {type(err).__name__}: {str(err)[:200]}", flush=True)
        return float("inf")
    k = kernels.last_compiled
    print(
        f"{setting}: {ms:.3f} ms, {read / ms / 1e6:.0f} GB/s, regs {k.n_regs}, spills {k.n_spills}, "
        f"shared {k.metadata.shared}",
        flush=True,
    )
    return ms


def sweep(layer, q, context: int, batch: int) -> dict[str, int]:  # type: ignore[no-untyped-def]
    read = layer.key_nbytes() + layer.value_nbytes()
    sdpa = sdpa_ms(q, context)
    print(f"context {context} batch {batch}: {read / 1e6:.1f} MB to read; bf16 sdpa {sdpa:.3f} ms", flush=True)
    results = {}
    base = dict(DEFAULT_LAUNCH)
    for maxnreg in (0, 128, 168, 200):
        setting = {**base, "maxnreg": maxnreg}
        results[tuple(setting.items())] = time_setting(layer, q, read, **setting)
    best = dict(min(results, key=results.__getitem__))
    variants = [{"min_rows": 16}, {"min_rows": 4}, {"asm": 0}, {"tile": 32}, {"num_warps": 2}]
    variants += [{"num_warps": 2, "min_rows": 16}, {"num_warps": 4}]
    variants += [{"programs_per_sm": 8}, {"programs_per_sm": 32}, {"programs_per_sm": 64}]
    variants += [{"min_split_tokens": 64}, {"min_split_tokens": 1024}]
    for variant in variants:
        setting = {**best, **variant}
        results[tuple(setting.items())] = time_setting(layer, q, read, **setting)
    best = dict(min(results, key=results.__getitem__))
    ms = results[tuple(best.items())]
    print(f"best {best}: {ms:.3f} ms = {sdpa / ms:.2f}x bf16 sdpa ({read / ms / 1e6:.0f} GB/s)", flush=True)
    return best


def sdpa_ms(q: torch.Tensor, context: int) -> float:
    """bf16 sdpa decode attention over dense K/V of the same shapes (the reference time)."""
    k = torch.randn(q.shape[0], KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def dump(folder: Path, compiled) -> None:  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ttgir", "ptx"):
        (folder / f"decode.{name}").write_text(compiled.asm[name])
    (folder / "decode.cubin").write_bytes(compiled.asm["cubin"])


if __name__ == "__main__":
    main()
