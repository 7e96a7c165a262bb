"""Quality of the oblique side code against the query eigenbasis, rank by rank (CPU, the embedded model).

Both bases are the shipped ones (calibrated together on the Shakespeare calibration split); rows are
decode-exact perplexity on the evaluation split, as ``headq eval`` computes them, for 2-bit channel keys on
blocks of 64 with side codes of ranks 8 to 24.

    python benchmarks/oblique_vs_query.py --markdown results/oblique-vs-query.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers_headq.config import HeadQConfig
from transformers_headq.corpus import load_corpus, token_windows
from transformers_headq.evaluate import EvalSetup, Method, markdown_table, run_evaluation
from transformers_headq.loading import load_model
from transformers_headq.shipped import resolve_basis

RANKS = ((8, 4), (12, 3), (16, 3), (24, 3))  # (rank, side bits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    loaded = load_model()
    text = load_corpus("shakespeare", "evaluation").text
    ids = token_windows(loaded.tokenizer, text, 512, max_windows=args.windows)
    setup = EvalSetup(loaded.model, loaded.name, "shakespeare", ids, resolve_basis("shipped"), None, 4,
                      resolve_basis("shipped", control="oblique"))  # fmt: skip
    methods = [
        Method("k-only", "full-precision"),
        Method("k-only", "plain", "channel", HeadQConfig(key_bits=2, rank=0)),
    ]
    for kind in ("query", "oblique"):
        for rank, side_bits in RANKS:
            config = HeadQConfig(rank=rank, side_bits=side_bits, side_scale="block")
            methods.append(Method("k-only", "headq", "channel", config, kind))
    table = markdown_table(run_evaluation(setup, methods))
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(
            f"<!-- python benchmarks/oblique_vs_query.py --windows {args.windows} -->\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
