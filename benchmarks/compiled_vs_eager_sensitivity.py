"""Compiled against eager HeadQ on a random bf16 Llama whose sensitivity is chosen (``--init``, the weights' standard
deviation): ``decode_e2e.py``'s check (compiled and a second eager HeadQ decode, eager and compiled bf16
``StaticCache``, all fed eager HeadQ's greedy tokens) on any device, CPU included.

Why: on the GPU's random Llama-3-8B, compiled HeadQ's logits moved 3x more than compiled bf16's. A model that
compiling alone moves by percents feeds the compiled step keys that differ by percents; the block they commit then
holds other 2-bit codes, each a whole quantization step away. This script shows that mechanism where no GPU kernel
runs: the per-step error jumps at the step that commits a block, while HeadQ stays as far from bf16 compiled as
eager. Rows are written to ``--json`` as they finish.

    python benchmarks/compiled_vs_eager_sensitivity.py --init 0.02,0.08 --json OUT/sensitivity.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from decode_bench import HEADQ, random_basis
from decode_e2e import check_tokens

from transformers_headq import HeadQCacheFactory, enable_headq_attention
from transformers_headq.fingerprint import model_fingerprint


def random_llama(init: float, layers: int, device: str) -> Any:
    """A small bf16 Llama with the CUDA kernel's head shapes (head dim 128, 4 query heads a KV head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=128, vocab_size=4000, initializer_range=init)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="0.02,0.08", help="weights' standard deviations, ',' separated")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=200, help="prompt tokens (blocks of 64 commit at 256)")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for init in map(float, args.init.split(",")):
        model = random_llama(init, args.layers, args.device)
        enable_headq_attention(model)
        factory = HeadQCacheFactory(random_basis(HEADQ.rank or 0, model_fingerprint(model.config)), HEADQ, model.config)
        found = check_tokens(model, factory, args.tokens, prompt_len=args.prompt)
        rows.append({"init": init, "layers": args.layers, "prompt": args.prompt, "device": args.device, **found})
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        control, eager, compiled = (found[k] for k in ("control", "headq_eager_vs_bf16", "headq_compiled_vs_bf16"))
        print(f"init {init}, relative logit error (median / largest): compiled vs eager HeadQ "
              f"{found['logit_relative_error_median']:.4f} / {found['logit_relative_error_max']:.4f}; control "
              f"{control['logit_relative_error_median']:.4f} / {control['logit_relative_error_max']:.4f}; HeadQ to "
              f"bf16: eager {eager['logit_relative_error_median']:.4f}, compiled "
              f"{compiled['logit_relative_error_median']:.4f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
