"""HeadQ decode on a model split over GPUs, against the same model on one GPU (issue 19).

Two ways transformers splits a model, each through its own machinery:

- ``--parallel tp``: ``from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))`` under
  ``torchrun``; each rank computes a share of the KV heads and its cache holds that share of the basis.
- ``--parallel device_map``: ``from_pretrained(..., device_map="balanced")`` (accelerate): layers spread
  over the GPUs, each cache layer on its layer's device. ("auto" would put an 8B model on the first GPU.)
- ``--parallel one``: the reference, the whole model on one device.

The ``one`` run first decodes ``--check-tokens`` greedy tokens from a fixed prompt with HeadQ and, as the control,
with a ``DynamicCache`` (sdpa); a split run feeds those tokens (found in ``--json``: run ``one`` first) and compares
its argmax at every step with them: all equal exactly when its greedy tokens would be the same, and a flip does not
carry into the later steps. Tensor parallelism sums partial products in another order, so with random weights
(near-tied logits) even the control may flip a token; the control says whether a difference is the split's or
HeadQ's. Then each ``--rows CACHE@CONTEXTxBATCH`` row is timed (``transformers_headq.speed``).
Rows go into ``--json`` as they finish (rows of the same run, cache and shape are replaced), in the fields of
``decode-e2e-h200.json`` plus ``gpus``, ``parallel`` and ``same_tokens_as_one_gpu``.

    python decode_multigpu.py --make-model /tmp/llama3-8b-random          # Llama-3-8B shapes, random bf16
    python decode_multigpu.py --model /tmp/llama3-8b-random --parallel one --json decode-multigpu.json \\
        --check-tokens 64 --rows headq-compiled@32768x8,dynamic-flash@32768x8
    torchrun --nproc-per-node 2 decode_multigpu.py --model /tmp/llama3-8b-random --parallel tp ...
    python decode_multigpu.py --model /tmp/llama3-8b-random --parallel device_map ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from decode_bench import HEADQ, llama_3_8b_model, random_basis
from decode_e2e import NAMES, agreement, parse_runs, software_versions, speed_fields

from transformers_headq import HeadQCacheFactory, enable_headq_attention
from transformers_headq.fingerprint import model_fingerprint
from transformers_headq.loading import cache_kwargs
from transformers_headq.parallel import layer_devices
from transformers_headq.speed import compare_decode_speed

PROMPT_TOKENS = 96


def make_model(folder: Path) -> None:
    """Save a Llama-3-8B-shaped model with seeded random bf16 weights (timing needs no trained weights;
    every process loads the same file, as a split needs)."""
    torch.manual_seed(0)
    llama_3_8b_model("cuda" if torch.cuda.is_available() else "cpu").save_pretrained(folder)


def load(folder: str, parallel: str, device_map: str) -> Any:
    """The model, split the way ``parallel`` says."""
    from transformers import AutoModelForCausalLM, DistributedConfig

    if parallel == "tp":
        kwargs: dict[str, Any] = {"distributed_config": DistributedConfig(tp_plan="auto")}
    elif parallel == "device_map":
        kwargs = {"device_map": device_map}
    else:
        kwargs = {}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if parallel == "one" and torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def next_tokens(model: Any, cache: Any, new_tokens: int, forced: list[int] | None = None) -> list[int]:
    """The argmax token after a fixed seeded prompt (the same in every process) and after each token fed since.

    ``forced`` ``None``: greedy decoding (each argmax is fed back). Otherwise ``forced`` (the one-GPU run's greedy
    tokens) is fed, so that one flipped argmax does not change every later step: all argmaxes equal ``forced`` exactly
    when greedy decoding would give the same tokens, and otherwise their share says how often the split disagrees.
    """
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    ids, out = prompt.to(model.device), []
    with torch.no_grad():
        for step in range(new_tokens):
            logits = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache)).logits
            out.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1] if forced is None else forced[step]]], device=ids.device)
    return out


def compared(argmax: list[int], reference: list[int]) -> dict[str, Any]:
    """How a split's argmaxes, fed the one-GPU run's tokens, compare with those tokens."""
    found = agreement(torch.tensor([argmax]), torch.tensor([reference]))
    return {"same_tokens_as_one_gpu": found.pop("same_tokens"), **found}


def check_tokens(model: Any, factory: HeadQCacheFactory, new_tokens: int, reference: dict | None) -> dict[str, Any]:
    """HeadQ's and the control's (``DynamicCache``, sdpa) tokens: greedy on the one-GPU run; on a split, its argmaxes
    fed the one-GPU run's greedy tokens, compared with them."""
    from transformers import DynamicCache

    forced: dict[str, list[int] | None] = {"headq": None, "dynamic": None}
    if reference is not None:
        if reference["new_tokens"] < new_tokens:
            raise SystemExit(f"the one-GPU run decoded {reference['new_tokens']} tokens: check at most that many")
        forced = {name: reference[f"{name}_tokens"][:new_tokens] for name in forced}
    model.set_attn_implementation("sdpa")
    control = next_tokens(model, DynamicCache(), new_tokens, forced["dynamic"])
    enable_headq_attention(model)
    headq = next_tokens(model, factory(), new_tokens, forced["headq"])
    row: dict[str, Any] = {"check": "next tokens, HeadQ and DynamicCache", "new_tokens": new_tokens,
                           "headq_tokens": headq, "dynamic_tokens": control}  # fmt: skip
    if reference is not None:
        row |= compared(headq, reference["headq_tokens"][:new_tokens])
        row |= {f"dynamic_{k}": v for k, v in compared(control, reference["dynamic_tokens"][:new_tokens]).items()}
    return row


def gpus_used(model: Any, parallel: str) -> int:
    """GPUs the model runs on (0 on a CPU, where tensor-parallel ranks are processes)."""
    if parallel == "tp":
        return dist.get_world_size() if torch.cuda.is_available() else 0
    return len({d for d in layer_devices(model) if d.type == "cuda"})


def merge(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` into the JSON list at ``path``, replacing earlier rows of the same run and shape."""

    def key(row: dict[str, Any]) -> tuple:
        return tuple(row.get(k) for k in ("parallel", "gpus", "check", "cache", "context", "batch"))

    kept = json.loads(path.read_text()) if path.exists() else []
    new = {key(r) for r in rows}
    path.write_text(json.dumps([r for r in kept if key(r) not in new] + rows, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-model", type=Path, help="save the random Llama-3-8B-shaped model here and stop")
    parser.add_argument("--model", help="model folder (from --make-model, or any causal LM folder)")
    parser.add_argument("--parallel", choices=("one", "tp", "device_map"), default="one")
    parser.add_argument("--device-map", default="balanced", help="accelerate's device_map for --parallel device_map")
    parser.add_argument("--rows", default="", help="CACHE@CONTEXTxBATCH, ',' separated (caches of headq bench)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--check-tokens", type=int, default=0)
    parser.add_argument("--commit", help="the commit the run is made at (a device copy has no git)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.make_model:
        make_model(args.make_model)
        return
    if not args.model or not args.json:
        parser.error("--model and --json are needed (or --make-model)")
    if args.parallel == "tp" and not dist.is_initialized():
        if torch.cuda.is_available():  # NCCL binds a rank to the GPU current when it starts
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    writer = not dist.is_initialized() or dist.get_rank() == 0
    model = load(args.model, args.parallel, args.device_map)
    factory = HeadQCacheFactory.from_pretrained(
        random_basis(HEADQ.rank or 0, model_fingerprint(model.config)), model, **HEADQ.to_dict()
    )
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    processes = dist.get_world_size() if dist.is_initialized() else 1
    common = {"parallel": args.parallel, "gpus": gpus_used(model, args.parallel), "processes": processes,
              "commit": args.commit,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
              **software_versions()}  # fmt: skip
    same: bool | None = None

    def save(row: dict[str, Any]) -> None:
        shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items() if not isinstance(v, list)}
        if writer:
            print(shown, flush=True)
            merge(args.json, [row])

    if args.check_tokens:
        rows = json.loads(args.json.read_text()) if args.json.exists() else []
        reference = next((r for r in rows if r["parallel"] == "one" and "check" in r), None)
        if args.parallel != "one" and reference is None:
            print(f"no one-GPU tokens in {args.json} to compare with: run --parallel one first", file=sys.stderr)
        check = check_tokens(model, factory, args.check_tokens, None if args.parallel == "one" else reference)
        same = check.get("same_tokens_as_one_gpu")
        save(common | check)
    for cache, context, batch in parse_runs(args.rows) if args.rows else []:
        skipped: dict[str, str] = {}
        speeds = compare_decode_speed(
            model, factory, batch=batch, context=context, steps=args.steps, caches=(cache,),
            block_size=HEADQ.block_size, on_skip=skipped.__setitem__,
        )  # fmt: skip
        name = NAMES.get(cache, cache) if model.dtype == torch.bfloat16 else cache  # NAMES say bf16
        row = common | {"cache": name, "context": context, "batch": batch}
        if cache.startswith("headq"):
            row["same_tokens_as_one_gpu"] = None if args.parallel == "one" else same  # the reference itself
        if speeds:
            row |= speed_fields(speeds[0], weights_gib, model.config.num_hidden_layers)
        else:
            row["skipped"] = "; ".join(skipped.values())
        save(row)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
