"""HeadQ attention for a multi-token call (a prefill, a chunk of one) through torch's sdpa.

The corrected logit of a quantized token is linear in the query: ``q·k̂ + (qW)·ĉ = q·(k̂ + W ĉ)``.
So over the *effective* keys ``k̂ + W ĉ`` (dense, in the model dtype) plain scaled-dot-product
attention gives HeadQ's logits, and torch's fused sdpa kernels replace the float32 reference walk
(on the CPU this halves the cost of a prefill through the cache).

One subtlety keeps a one-forward prefill decode-exact: a token whose block filled during this call
is seen quantized only by query rows at or after the block's last slot; earlier rows see its exact
state (what a token-by-token decode showed them). The call's keys are therefore the stored view
(quantized slots as effective keys, then the full-precision window) followed by exact copies of the
slots flushed in this call, and the boolean mask gives each (row, slot) pair exactly one of its two
copies. Everything transformers' own mask forbids stays forbidden.

What this path cannot do, and leaves to the reference in :mod:`attention`: a soft-capped logit
(sdpa has no soft cap), and the A² bookkeeping (it needs the probabilities themselves). It holds
the layer's dense effective keys and values for the duration of the call, about one layer of a
full-precision cache: the reference path walks the cache in chunks instead.
"""

from __future__ import annotations

import torch

from .handoff import AttentionInputs
from .layer import HeadQLayer

ROWS_PER_CALL = 2048  # query rows per sdpa call: bounds the mask of a long prefill


def can_use_effective_sdpa(inputs: AttentionInputs[HeadQLayer], q_len: int, softcap: float | None) -> bool:
    """Whether this call can run through sdpa over effective keys (see the module docstring)."""
    layer = inputs.layer
    needs_probabilities = layer.attention_mass is not None or (layer.kept is not None and layer.kept.by_attention)
    return q_len > 1 and softcap is None and not needs_probabilities


def _row_key_mask(
    inputs: AttentionInputs[HeadQLayer], rows: range, mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """The sdpa mask of query ``rows`` (indices into the call's queries) over the stored slots then the
    exact copies of the slots flushed in this call: ``[.., len(rows), stored + copies]``.

    A boolean mask stays boolean, an additive one stays additive (forbidden pairs get ``-inf``).
    """
    layer = inputs.layer
    stored = layer.stored_length
    slots = torch.arange(stored, device=device)
    row_slots = inputs.query_start + torch.arange(rows.start, rows.stop, device=device)
    fresh_end = _fresh_end(inputs)
    fresh = slots[inputs.fresh_start : fresh_end]
    block = layer.config.block_size
    sees_exact = row_slots[:, None] < ((fresh // block + 1) * block - 1)[None, :]  # [rows, copies]
    # Which copy a row may read: the stored one, except fresh slots whose block ends after the row.
    structure = torch.ones(len(rows), stored, dtype=torch.bool, device=device)
    structure[:, inputs.fresh_start : fresh_end] = ~sees_exact
    structure = torch.cat([structure, sees_exact], dim=-1)
    if mask is None:
        part = (slots[None, :] <= row_slots[:, None])[None, None]
    else:
        part = mask[..., rows.start : rows.stop, :stored]
    base = torch.cat([part, part[..., inputs.fresh_start : fresh_end]], dim=-1)
    if base.dtype == torch.bool:
        return base & structure
    return base.masked_fill(~structure, float("-inf"))


def _fresh_end(inputs: AttentionInputs[HeadQLayer]) -> int:
    """End of the slots flushed in this call (they have exact copies from ``fresh_start`` to here)."""
    return inputs.layer.quantized_length if inputs.fresh_keys is not None else inputs.fresh_start


def effective_sdpa_attention(
    inputs: AttentionInputs[HeadQLayer], query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """HeadQ attention of ``query`` [B, H_q, Q, D] over a layer by sdpa; returns ``[B, Q, H_q, D_v]``.

    Query rows go ``ROWS_PER_CALL`` at a time, so the mask (rows x twice the slots of a long prompt) never
    has to exist whole; the keys and values are built once."""
    layer = inputs.layer
    keys = [layer.effective_keys()]
    values = [layer.effective_values()]  # a position policy picks its kept tokens here, before any row reads them
    if _fresh_end(inputs) > inputs.fresh_start:
        assert inputs.fresh_keys is not None and inputs.fresh_values is not None
        keys.append(inputs.fresh_keys)
        values.append(inputs.fresh_values)
    all_keys = torch.cat(keys, dim=-2).to(query.dtype)
    all_values = torch.cat(values, dim=-2).to(query.dtype)
    q_len = query.shape[2]
    parts = []
    for start in range(0, q_len, ROWS_PER_CALL):
        rows = range(start, min(q_len, start + ROWS_PER_CALL))
        allowed = _row_key_mask(inputs, rows, attention_mask, query.device)
        if allowed.dtype != torch.bool:
            allowed = allowed.to(query.dtype)
        part = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, rows.start : rows.stop],
            all_keys,
            all_values,
            attn_mask=allowed,
            scale=scaling,
            enable_gqa=query.shape[1] != layer.shape[1],
        )
        parts.append(part)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous()
