"""Where the host time of a compiled HeadQ decode step goes (GPU): a Python profile of ``--steps``
CUDA-graph replays of a fixed-capacity HeadQ cache, Llama-3-8B shapes with random bf16 weights.

A compiled step's wall time exceeds its GPU busy time by a few milliseconds (decode-e2e-h200.md); this
prints, for synchronised steps after the warm-up and the compilation, the wall and host time a step,
the guards torch.compile checks before each step (how many, how long their check takes alone) and the
functions the host spends the step in (cProfile, by own time), so the gap can be attributed.

    python benchmarks/compiled_host_profile.py --context 32768 --batch 8
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from decode_bench import HEADQ, llama_3_8b_model, random_basis

from transformers_headq import HeadQCacheFactory, enable_headq_attention
from transformers_headq.speed import fill_with_random_states


def guard_report(model: torch.nn.Module, kwargs: dict) -> str:
    """How many guards the compiled forward checks per call, and how long the check takes alone.

    Reads dynamo's cache entry of the model's forward (a private interface: diagnostics only); the
    frame is transformers' output wrapper, whose locals are its arguments (``self`` where it names it),
    ``args``, ``kwargs`` and its closure."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    forward = type(model).forward
    entries = _debug_get_cache_entry_list(forward.__code__)
    if len(entries) != 1:
        return f"guards: {len(entries)} compiled entries, not one (cannot attribute)"
    guards = entries[0].guard_manager
    closure = dict(zip(forward.__code__.co_freevars, (c.cell_contents for c in forward.__closure__ or ()), strict=True))
    code = forward.__code__
    named_self = "self" in code.co_varnames[: code.co_argcount]
    frame = {**closure, **({"self": model, "args": ()} if named_self else {"args": (model,)}), "kwargs": kwargs}
    info = guards.check_verbose(frame)
    if not info.result:
        return f"guards: the probe's frame fails them ({info.verbose_code_parts[:1]}): cannot time"
    start = time.perf_counter()
    for _ in range(100):
        guards.check(frame)
    check_us = (time.perf_counter() - start) / 100 * 1e6
    tensors = str(guards).count("TENSOR_MATCH")
    return f"guards: {info.num_guards_executed} checked a call ({tensors} tensors), {check_us:.0f} us to check"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    model = llama_3_8b_model()
    enable_headq_attention(model)
    cache = HeadQCacheFactory(random_basis(HEADQ.rank or 0), HEADQ, model.config)(
        max_cache_len=args.context + 4 * HEADQ.block_size
    )
    fill_with_random_states(model, cache, args.batch, args.context)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    token = torch.zeros(args.batch, 1, dtype=torch.long, device="cuda")
    position = [args.context]

    def one() -> tuple[float, float]:
        positions = torch.full((args.batch, 1), position[0], device="cuda", dtype=torch.long)
        start = time.perf_counter()
        step(input_ids=token, position_ids=positions, past_key_values=cache, use_cache=True)
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        position[0] += 1
        return time.perf_counter() - start, host

    with torch.no_grad():
        for _ in range(HEADQ.block_size + 2):
            one()
        walls, hosts = zip(*(one() for _ in range(args.steps)), strict=True)
        print(f"wall ms/step {statistics.median(walls) * 1e3:.2f}, host ms/step {statistics.median(hosts) * 1e3:.2f}")
        positions = torch.full_like(token, position[0])
        frame_locals = {"input_ids": token, "position_ids": positions, "past_key_values": cache, "use_cache": True}
        print(guard_report(model, frame_locals))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            one()
        profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
