"""Whole-model decode on the GPU: HeadQ (eager and compiled) against bf16 DynamicCache (flash sdpa) and
transformers' StaticCache + torch.compile, Llama-3-8B shapes with random bf16 weights.

Each ``--run CACHE@CONTEXTxBATCH`` row fills a fresh cache with random states and times whole decode
steps (``transformers_headq.speed``: warm-up past the first block flush and the compilation, then
``--steps`` timed steps, each waited for; the GPU's busy time in one step; peak memory). Rows are
written to ``--json`` as they finish; a row that does not fit the GPU is recorded as skipped.
Before the rows, ``--check-tokens N`` decodes N greedy tokens with eager HeadQ from a prompt (a batch with left
padding), feeds them to compiled HeadQ and records whether its argmax agrees at every step, and how often.

    python benchmarks/decode_e2e.py --json benchmarks/decode-e2e-h200.json \\
        --run dynamic-flash@32768x8,static-compiled@32768x8,headq@32768x8,headq-compiled@32768x8
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch
from decode_bench import HEADQ, LAYERS, llama_3_8b_model, random_basis

from transformers_headq import HeadQCacheFactory
from transformers_headq.loading import cache_kwargs
from transformers_headq.speed import DecodeSpeed, compare_decode_speed

NAMES = {"dynamic-flash": "dynamic-bf16-flash", "static-compiled": "static-bf16-compiled", "dynamic": "dynamic-bf16"}


def parse_runs(text: str) -> list[tuple[str, int, int]]:
    runs = []
    for item in filter(None, text.split(",")):
        cache, _, shape = item.partition("@")
        context, _, batch = shape.partition("x")
        runs.append((cache.strip(), int(context), int(batch)))
    return runs


def check_tokens(model: Any, factory: HeadQCacheFactory, new_tokens: int, prompt_len: int = 300) -> dict[str, Any]:
    """Compiled HeadQ decode (fixed capacity) against eager, from one left-padded batch of two prompts: eager's
    greedy tokens, and compiled's argmax at each step fed eager's tokens (so that one flipped argmax, as the
    compiled model's fused arithmetic rounding a near-tie the other way, does not change every later step).

    A random-weight model's top logits are near-ties and its states sensitive, so two more decodes, fed the same
    tokens, say what the numbers mean: transformers' bf16 ``StaticCache`` compiled against eager (``control``: the
    difference compiling alone makes), and eager bf16 as the full-precision reference for both HeadQ decodes
    (``headq_eager_vs_bf16``, ``headq_compiled_vs_bf16``): a 2-bit code at a rounding tie may store the other way
    when compiled, which moves the logits more than bf16's last bits, but it must not make HeadQ further from full
    precision than eager HeadQ is. ``headq_eager_again`` decodes eagerly once more: the CUDA kernel's claimed tiles
    sum in run-dependent order (``torch.use_deterministic_algorithms(True)`` deals them instead), and a random model
    may amplify those last bits."""
    from transformers import StaticCache

    device = model.device
    prompt = torch.randint(0, model.config.vocab_size, (2, prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    capacity = prompt_len + new_tokens

    def bf16() -> StaticCache:
        return StaticCache(config=model.config, max_cache_len=capacity)

    eager, eager_logits = _decode(model, model, factory(max_cache_len=capacity), prompt, new_tokens)
    again, again_logits = _decode(model, model, factory(max_cache_len=capacity), prompt, new_tokens, eager)
    reference = _decode(model, model, bf16(), prompt, new_tokens, eager)[1]
    compiled, compiled_logits = _decode(
        model, _compiled(model), factory(max_cache_len=capacity), prompt, new_tokens, eager
    )
    control, control_logits = _decode(model, _compiled(model), bf16(), prompt, new_tokens, eager)
    return {"check": "compiled HeadQ's argmax fed eager HeadQ's greedy tokens", "new_tokens": new_tokens,
            **agreement(compiled, eager), **logit_error(compiled_logits, eager_logits),
            "control": {"cache": "StaticCache (bf16), compiled against eager, fed the same tokens",
                        **agreement(control, reference.argmax(-1).cpu()), **logit_error(control_logits, reference)},
            "headq_eager_again": {**agreement(again, eager), **logit_error(again_logits, eager_logits)},
            "headq_eager_vs_bf16": logit_error(eager_logits, reference),
            "headq_compiled_vs_bf16": logit_error(compiled_logits, reference)}  # fmt: skip


def _compiled(model: Any) -> Any:
    """``model.forward`` compiled as a user compiles a fixed-capacity decode (CUDA graphs on the GPU), afresh."""
    torch._dynamo.reset()
    mode = "reduce-overhead" if model.device.type == "cuda" else None
    return torch.compile(model.forward, mode=mode, fullgraph=True)


def _decode(
    model: Any, step: Any, cache: Any, prompt: torch.Tensor, new_tokens: int, forced: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2, new_tokens]`` argmax tokens and their float32 logits ``[2, new_tokens, vocab]``: the prefill by
    ``model``, then decode steps by ``step`` fed their own argmax (greedy) or ``forced``'s tokens. The second
    prompt is left-padded. The 2-D attention mask spans the whole capacity from the start (ones where a token is),
    so a compiled step sees the same shapes at every step, as ``generate`` arranges for static caches."""
    prompt_len = prompt.shape[1]
    mask = torch.zeros(2, prompt_len + new_tokens, dtype=torch.long, device=prompt.device)
    mask[:, :prompt_len] = 1
    mask[1, : prompt_len // 8] = 0
    positions = (mask[:, :prompt_len].cumsum(-1) - 1).clamp(min=0)
    passed = cache_kwargs(model, cache)
    with torch.no_grad():
        out = model(input_ids=prompt, attention_mask=mask, position_ids=positions, **passed)
        logits = [out.logits[:, -1].float()]
        for t in range(prompt_len, prompt_len + new_tokens - 1):
            mask[:, t] = 1
            position = mask.sum(-1, keepdim=True) - 1
            fed = logits[-1].argmax(-1) if forced is None else forced[:, len(logits) - 1].to(prompt.device)
            out = step(input_ids=fed[:, None], attention_mask=mask.clone(), position_ids=position, **passed)
            logits.append(out.logits[:, -1].float())
    stacked = torch.stack(logits, 1)
    return stacked.argmax(-1).cpu(), stacked


def logit_error(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """How far logits ``[B, N, V]`` are from ``reference``'s: the relative error of each step's logit vector
    (median and largest, and the largest over the batch at each step: a jump at the step that commits a block
    points at the stored codes), the median largest entry error, and the median gap between the reference's two
    top logits (an argmax flips where the error at those two entries exceeds the gap)."""
    error = logits - reference
    relative = error.norm(dim=-1) / reference.norm(dim=-1)
    top2 = reference.topk(2, dim=-1).values
    return {"logit_relative_error_median": relative.median().item(), "logit_relative_error_max": relative.max().item(),
            "logit_relative_error_by_step": [round(e, 5) for e in relative.amax(0).tolist()],
            "logit_max_abs_error_median": error.abs().amax(-1).median().item(),
            "top2_gap_median": (top2[..., 0] - top2[..., 1]).median().item()}  # fmt: skip


def agreement(argmax: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """How argmax tokens ``[B, N]``, each step fed ``reference``'s tokens, compare with them: all equal exactly when
    greedy decoding would give ``reference``; otherwise the first step that differs and the share that agree."""
    equal = argmax == reference
    differ = (~equal).any(0).nonzero()
    return {"same_tokens": bool(equal.all()), "first_difference": int(differ[0]) if len(differ) else None,
            "argmax_agreement": int(equal.sum()) / equal.numel()}  # fmt: skip


def software_versions() -> dict[str, str]:
    """The versions a GPU row depends on, recorded beside it."""
    import transformers
    import triton

    return {"torch": torch.__version__, "python": platform.python_version(), "transformers": transformers.__version__,
            "triton": triton.__version__}  # fmt: skip


def speed_fields(speed: DecodeSpeed, weights_gib: float, layers: int) -> dict[str, Any]:
    """One measured decode speed in the fields of ``decode-e2e-*.json`` rows."""
    return {
        "decode_tokens_per_s": speed.tokens_per_s, "decode_ms_per_step": speed.ms_per_step,
        "decode_ms_median": speed.ms_median, "gpu_busy_ms_per_step": speed.gpu_busy_ms, "peak_gib": speed.peak_gib,
        "kv_bytes_per_token": speed.kv_bytes_per_token, "cache_gib": speed.cache_gib, "weights_gib": weights_gib,
        "slowest_warmup_ms": speed.slowest_warmup_ms, "layers": layers,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="", help="CACHE@CONTEXTxBATCH rows, ',' separated (none: the check alone)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--check-tokens", type=int, default=0)
    parser.add_argument("--sink-keys", type=int, default=HEADQ.sink_keys, help="HeadQ rows' exact first keys")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument(
        "--deterministic", action="store_true", help="torch.use_deterministic_algorithms: kernels sum in fixed order"
    )
    args = parser.parse_args()
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)

    model = llama_3_8b_model()
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    basis = random_basis(HEADQ.rank or 0)
    factory = HeadQCacheFactory(basis, HEADQ.replace(sink_keys=args.sink_keys), model.config)
    gpu = torch.cuda.get_device_name()
    versions = software_versions()
    rows: list[dict[str, Any]] = []

    def save() -> None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")

    if args.check_tokens:
        from transformers_headq import enable_headq_attention

        enable_headq_attention(model)
        rows.append({**check_tokens(model, factory, args.check_tokens), "gpu": gpu, **versions})
        print(rows[-1], flush=True)
        save()
    for cache, context, batch in parse_runs(args.run):
        skipped: dict[str, str] = {}
        speeds = compare_decode_speed(
            model, factory, batch=batch, context=context, steps=args.steps, caches=(cache,),
            block_size=HEADQ.block_size, on_skip=skipped.__setitem__,
        )  # fmt: skip
        row: dict[str, Any] = {"cache": NAMES.get(cache, cache), "context": context, "batch": batch, "gpu": gpu}
        if cache.startswith("headq"):
            row["sink_keys"] = args.sink_keys
        if not speeds:
            row["skipped"] = "; ".join(skipped.values())
        else:
            row |= speed_fields(speeds[0], weights_gib, LAYERS) | versions
        rows.append(row)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        save()


if __name__ == "__main__":
    main()
