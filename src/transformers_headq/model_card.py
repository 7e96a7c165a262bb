"""Model cards for query bases: Hub metadata, how the basis was made, measured quality, usage.

A basis is findable on the Hub by its card's metadata (library, base model, tags, licence,
datasets) and its quality is visible before download: the card carries the rows of a
``headq eval`` run when there is one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol


class CardSource(Protocol):
    """What a card shows of a basis (:class:`~transformers_headq.QueryBasis` has it)."""

    fingerprint: dict[str, Any]
    metadata: dict[str, Any]
    quantizer: dict[str, Any]
    kind: str

    @property
    def rank(self) -> int: ...


CARD_TAGS = ["headq", "kv-cache", "quantization", "query-basis", "transformers-headq"]


def _quality_table(rows: Iterable[Mapping[str, Any]]) -> str:
    lines = [
        "| mode | method | setting | key bits/elem | value bits/elem | PPL |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['method']} | {row.get('setting', '')} | {row['key_bits']:.3f} | "
            f"{row['value_bits']:.3f} | {row['ppl']:.3f} |"
        )
    return "\n".join(lines)


def _dataset_ids(corpus: str) -> list[str]:
    """Hub dataset ids named by a corpus spec (``hf:NAME[:CONFIG]``); other corpora have none."""
    return [corpus.split(":")[1]] if corpus.startswith("hf:") else []


def basis_model_card(
    basis: CardSource,
    repo_id: str,
    base_model: str | None = None,
    quality_rows: Iterable[Mapping[str, Any]] | None = None,
    license: str = "apache-2.0",
) -> Any:
    """A ``huggingface_hub.ModelCard`` for ``basis``, to be saved as ``README.md`` beside it.

    ``base_model`` is the Hub id of the model the basis was calibrated for (shown and linked on the
    Hub); ``quality_rows`` are rows of ``headq eval --json`` measured with this basis.
    """
    from huggingface_hub import ModelCard, ModelCardData

    meta = basis.metadata
    fp = basis.fingerprint
    corpus = str(meta.get("corpus", "unknown"))
    data = ModelCardData(
        library_name="transformers-headq",
        base_model=base_model,
        license=license,
        tags=CARD_TAGS,
        datasets=_dataset_ids(corpus) or None,
    )
    settings = ", ".join(f"{k}={v}" for k, v in sorted(basis.quantizer.items())) or "library defaults"
    made = [
        f"- model: {meta.get('model_id', base_model or 'unknown')} ({fp['model_type']}, {fp['num_hidden_layers']} "
        f"layers, {fp['num_attention_heads']} query heads, {fp['num_key_value_heads']} KV heads, "
        f"head dim {fp['head_dim']})",
        f"- calibration text: {corpus}, {meta.get('calibration_tokens', '?')} tokens in windows of "
        f"{meta.get('sequence_length', '?')}, {meta.get('processes', 1)} process(es)",
        f"- stored rank: {basis.rank} directions per KV head ({basis.kind} basis)",
        f"- cache settings it was tuned for: {settings}",
    ]
    quality = "No quality measurement was attached to this basis."
    rows = list(quality_rows or [])
    if rows:
        first = rows[0]
        quality = (
            f"Decode-exact perplexity on {first['corpus']} (evaluation split, disjoint from the calibration "
            f"text), {first['tokens']} tokens, measured with `headq eval`:\n\n{_quality_table(rows)}"
        )
    body = f"""---
{data.to_yaml()}
---

# HeadQ query basis: {repo_id}

A calibrated query basis for [transformers-headq](https://pypi.org/project/transformers-headq/):
2-bit KV-cache quantization that stores, beside each 2-bit key, a small side code of its
quantization error projected on this basis, and adds it back as a correction to the attention logits.

## How it was made

{chr(10).join(made)}

## Quality

{quality}

## Use

```python
from transformers_headq import HeadQCache

cache = HeadQCache.from_pretrained("{repo_id}", model=model)  # refuses a basis made for another model
out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
```
"""
    return ModelCard(body)
