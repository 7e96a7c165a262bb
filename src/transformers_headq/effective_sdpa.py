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


def can_use_effective_sdpa(inputs: AttentionInputs, q_len: int, softcap: float | None) -> bool:
    """Whether this call can run through sdpa over effective keys (see the module docstring)."""
    layer = inputs.layer
    needs_probabilities = layer.attention_mass is not None or (layer.kept is not None and layer.kept.by_attention)
    return q_len > 1 and softcap is None and not needs_probabilities


def _row_key_mask(
    inputs: AttentionInputs, q_len: int, mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, int]:
    """The sdpa mask over stored slots then exact copies (``[.., Q, stored + copies]``), and the copies' count.

    A boolean mask stays boolean, an additive one stays additive (forbidden pairs get ``-inf``).
    """
    layer = inputs.layer
    stored = layer.stored_length
    slots = torch.arange(stored, device=device)
    rows = inputs.query_start + torch.arange(q_len, device=device)
    fresh_end = layer.quantized_length if inputs.fresh_keys is not None else inputs.fresh_start
    fresh = slots[inputs.fresh_start : fresh_end]
    block = layer.config.block_size
    sees_exact = rows[:, None] < ((fresh // block + 1) * block - 1)[None, :]  # [Q, copies]
    # Which copy a row may read: the stored one, except fresh slots whose block ends after the row.
    structure = torch.ones(q_len, stored, dtype=torch.bool, device=device)
    structure[:, inputs.fresh_start : fresh_end] = ~sees_exact
    structure = torch.cat([structure, sees_exact], dim=-1)
    if mask is None:
        causal = (slots[None, :] <= rows[:, None])[None, None]
        base = torch.cat([causal, causal[..., inputs.fresh_start : fresh_end]], dim=-1)
    else:
        part = mask[..., :stored]
        base = torch.cat([part, part[..., inputs.fresh_start : fresh_end]], dim=-1)
    if base.dtype == torch.bool:
        return base & structure, fresh.numel()
    return base.masked_fill(~structure, float("-inf")), fresh.numel()


def effective_sdpa_attention(
    inputs: AttentionInputs, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """HeadQ attention of ``query`` [B, H_q, Q, D] over a layer by sdpa; returns ``[B, Q, H_q, D_v]``."""
    layer = inputs.layer
    if layer.kept is not None:
        layer.kept.choose()  # a position policy picks its kept tokens before any row reads them
    allowed, copies = _row_key_mask(inputs, query.shape[2], attention_mask, query.device)
    keys = [layer.effective_keys()]
    values = [layer.effective_values()]
    if copies:
        assert inputs.fresh_keys is not None and inputs.fresh_values is not None
        keys.append(inputs.fresh_keys)
        values.append(inputs.fresh_values)
    if allowed.dtype != torch.bool:
        allowed = allowed.to(query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        torch.cat(keys, dim=-2).to(query.dtype),
        torch.cat(values, dim=-2).to(query.dtype),
        attn_mask=allowed,
        scale=scaling,
        enable_gqa=query.shape[1] != layer.shape[1],
    )
    return out.transpose(1, 2).contiguous()
