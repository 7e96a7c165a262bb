"""Transfer: does a basis calibrated on one corpus still remove the excess perplexity on another?

Calibrates a second basis for the default model on the `pydoc` corpus (the shipped one was
calibrated on `shakespeare`), then evaluates both bases on the evaluation split of both corpora
(the `core` rows of `headq eval`), and writes a table of the share of plain 2-bit's excess
perplexity that each HeadQ setting removes.

    python benchmarks/transfer.py --output results     # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers_headq import QueryBasis
from transformers_headq.calibrate import calibrate
from transformers_headq.corpus import batches, load_corpus, token_windows
from transformers_headq.evaluate import EvalSetup, excess_removed, run_evaluation, standard_methods
from transformers_headq.loading import load_model
from transformers_headq.shipped import shipped_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("results"))
    parser.add_argument("--calibration-windows", type=int, default=64, help="512-token windows of pydoc")
    parser.add_argument("--windows", type=int, default=4, help="512-token evaluation windows per corpus")
    args = parser.parse_args()

    loaded = load_model()
    shipped = QueryBasis.from_pretrained(shipped_path())
    text = load_corpus("pydoc", "calibration").text
    windows = token_windows(loaded.tokenizer, text, 512, args.calibration_windows)
    metadata = {"corpus": "pydoc", "sequence_length": 512}
    pydoc = calibrate(loaded.model, batches(windows, 4), rank=shipped.rank, metadata=metadata, progress=True)["query"]
    bases = {"shakespeare": shipped, "pydoc": pydoc}

    rows, lines = (
        [],
        ["| calibrated on | evaluated on | setting | PPL fp | PPL plain K2 | PPL HeadQ | excess removed |"],
    )
    lines.append("|---|---|---|---:|---:|---:|---:|")
    for corpus in ("shakespeare", "pydoc"):
        ids = token_windows(loaded.tokenizer, load_corpus(corpus, "evaluation").text, 512, args.windows)
        for basis_corpus, basis in bases.items():
            setup = EvalSetup(loaded.model, loaded.name, corpus, ids, basis, None, batch_size=4)
            results = run_evaluation(setup, standard_methods("core"))
            fp = next(r for r in results if r.method == "full-precision")
            plain = next(r for r in results if r.method == "plain")
            for r in results:
                rows.append({**r.to_dict(), "basis_corpus": basis_corpus})
                if r.method == "headq":
                    share = excess_removed(fp, r, plain)
                    lines.append(
                        f"| {basis_corpus} | {corpus} | {r.setting} | {fp.ppl:.2f} | {plain.ppl:.2f} | "
                        f"{r.ppl:.2f} | {100 * share:.1f}% |"
                    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "transfer.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.output / "transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
