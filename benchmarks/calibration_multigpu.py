"""Multi-GPU calibration: tokens per second on 1 and N GPUs, and how far the bases are apart.

Three steps, so the calibrations themselves run through the real command line
(`headq calibrate` and `accelerate launch ... calibrate`), exactly as users run them:

    python benchmarks/calibration_multigpu.py make-model --output /tmp/model --tokenizer TOKENIZER_DIR
    headq calibrate --model /tmp/model --device cuda --output /tmp/basis-1 ...
    accelerate launch --num_processes 2 -m transformers_headq.cli calibrate --model /tmp/model --output /tmp/basis-2 ...
    python benchmarks/calibration_multigpu.py compare /tmp/basis-1 /tmp/basis-2 --json ... --markdown ...

`make-model` writes a randomly initialised Llama-3.2-1B-shaped model (or a tiny one) (random weights are fine for
timing, and the basis comparison holds for any weights) with a real tokenizer beside it.
`compare` reads tokens/s from each basis's metadata (forwards and all-reduce, not loading) and
the largest element-wise difference of each basis from the first one, after aligning the sign of
every eigenvector (an eigenvector is defined up to sign).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from transformers_headq import QueryBasis

SHAPES = {
    "llama-1b": {  # Llama-3.2-1B
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
    },
    "tiny": {  # for trying the pipeline on a CPU
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    },
}


def make_model(output: Path, tokenizer_dir: Path, shape: str, seed: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), **SHAPES[shape])
    model = LlamaForCausalLM(config)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(f"wrote {output}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")


def aligned_difference(reference: QueryBasis, other: QueryBasis) -> float:
    """Largest |U_ref - U_other| after flipping each column of U_other to agree in sign."""
    worst = 0.0
    for a, b in zip(reference.layers, other.layers, strict=True):
        signs = torch.sign((a.U * b.U).sum(dim=-2, keepdim=True))
        signs[signs == 0] = 1
        worst = max(worst, (a.U - b.U * signs).abs().max().item())
    return worst


def eigen_gap(basis: QueryBasis) -> float:
    """Smallest relative gap between consecutive kept eigenvalues: where sign-aligned vectors may rotate."""
    gaps = []
    for layer in basis.layers:
        values = layer.eigenvalues[..., : basis.rank + 1]
        gaps.append(((values[..., :-1] - values[..., 1:]) / values[..., :1]).min())
    return float(torch.stack(gaps).min())


def compare(folders: list[Path], json_path: Path, markdown_path: Path, gpu: str) -> None:
    bases = [QueryBasis.from_pretrained(folder) for folder in folders]
    rows = []
    for folder, basis in zip(folders, bases, strict=True):
        meta = basis.metadata
        rows.append(
            {
                "gpus": int(meta["processes"]),
                "tokens": int(meta["calibration_tokens"]),
                "seconds": float(meta["calibration_seconds"]),
                "tokens_per_s": meta["calibration_tokens"] / meta["calibration_seconds"],
                "max_basis_diff": aligned_difference(bases[0], basis),
                "gpu": gpu,
                "basis": folder.name,
            }
        )
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| GPUs | tokens | seconds | tokens/s | speed-up | max basis diff |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['gpus']} | {row['tokens']} | {row['seconds']:.2f} | {row['tokens_per_s']:,.0f} | "
            f"{row['speedup']:.2f}x | {row['max_basis_diff']:.2e} |"
        )
    lines.append(f"\nGPU: {gpu}. Smallest relative eigenvalue gap among kept directions: {eigen_gap(bases[0]):.2e}.")
    markdown_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-model", help="write a random-weight Llama-shaped model and tokenizer")
    make.add_argument("--output", type=Path, required=True)
    make.add_argument("--tokenizer", type=Path, required=True, help="folder holding a tokenizer to reuse")
    make.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    make.add_argument("--seed", type=int, default=0)
    cmp = commands.add_parser("compare", help="tokens/s and basis differences of calibrated bases")
    cmp.add_argument("bases", type=Path, nargs="+", help="basis folders; the first is the reference")
    cmp.add_argument("--json", type=Path, required=True)
    cmp.add_argument("--markdown", type=Path, required=True)
    cmp.add_argument("--gpu", default=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.command == "make-model":
        make_model(args.output, args.tokenizer, args.shape, args.seed)
    else:
        compare(args.bases, args.json, args.markdown, args.gpu)


if __name__ == "__main__":
    main()
