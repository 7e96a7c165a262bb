"""Calibration: capture post-RoPE queries, accumulate their second moment, write a QueryBasis.

The second moment ``Σ_q = E[q qᵀ]`` is accumulated per layer and KV head (query heads sharing a
KV head are pooled) in float64, one batch at a time, so memory is bounded whatever the corpus
size. Sums are plain sums, so several processes (``torch.distributed``, e.g. launched by
``accelerate launch``) each read their share of the text and all-reduce the sums before the
eigendecomposition: the result equals one process reading everything, up to float error.

Queries are captured in the attention function itself (a registered wrapper around SDPA), which
receives them after RoPE exactly as attention uses them, for every model that routes attention
through transformers' ``AttentionInterface``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch

from .basis import OBLIQUE, LayerBasis, QueryBasis, basis_from_second_moment, oblique_code
from .fingerprint import check_supported, model_fingerprint, text_config
from .parallel import layer_devices, tensor_parallel_kv_heads
from .quantize import GroupQuantizer

CAPTURE_ATTENTION = "headq_capture"
AttentionObserver = Callable[[int, torch.Tensor, torch.Tensor], None]
_observers: list[AttentionObserver] = []


class QueryMoments:
    """Running ``Σ x xᵀ``, ``Σ x`` and counts for one layer, per KV head, in float64.

    Counts are per head so that processes holding different heads (tensor parallelism) sum into
    one set of statistics: each head's sums come from the ranks that compute it."""

    def __init__(self, kv_heads: int, head_dim: int, device: torch.device | str = "cpu") -> None:
        self.sum_outer = torch.zeros(kv_heads, head_dim, head_dim, dtype=torch.float64, device=device)
        self.sum = torch.zeros(kv_heads, head_dim, dtype=torch.float64, device=device)
        self.count = torch.zeros(kv_heads, dtype=torch.float64, device=device)

    def add(self, queries: torch.Tensor, heads: slice | None = None) -> None:
        """Add queries ``[batch, q_heads, tokens, head_dim]`` of KV heads ``heads`` (default: all);
        ``q_heads`` is a multiple of those KV heads."""
        heads = slice(None) if heads is None else heads
        batch, q_heads, tokens, head_dim = queries.shape
        kv_heads = self.sum[heads].shape[0]
        if q_heads % kv_heads:
            raise ValueError(f"{q_heads} query heads cannot share {kv_heads} KV heads evenly")
        pooled = queries.detach().to(self.sum.device, torch.float64)
        pooled = pooled.reshape(batch, kv_heads, q_heads // kv_heads, tokens, head_dim)
        pooled = pooled.permute(1, 0, 2, 3, 4).reshape(kv_heads, -1, head_dim)
        self.sum_outer[heads] += pooled.transpose(1, 2) @ pooled
        self.sum[heads] += pooled.sum(1)
        self.count[heads] += pooled.shape[1]

    def all_reduce(self) -> None:
        """Sum the statistics over all processes of the default ``torch.distributed`` group."""
        import torch.distributed as dist

        for tensor in (self.sum_outer, self.sum, self.count):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def mean(self) -> torch.Tensor:
        """``E[x]`` per KV head, ``[H, D]``."""
        self._check_counts()
        return self.sum / self.count[:, None]

    def second_moment(self) -> torch.Tensor:
        """``E[x xᵀ]`` per KV head, ``[H, D, D]``."""
        self._check_counts()
        return self.sum_outer / self.count[:, None, None]

    def _check_counts(self) -> None:
        if (self.count == 0).any():
            raise ValueError("no vectors were accumulated for some KV heads")

    def to_layer_basis(self, rank: int, centered: bool = False) -> LayerBasis:
        """Eigenbasis of ``E[x xᵀ]`` (or of the covariance when ``centered``, as key PCA uses)."""
        mean, second = self.mean(), self.second_moment()
        if centered:
            second = second - mean[:, :, None] * mean[:, None, :]
        U, eigenvalues = basis_from_second_moment(second.cpu(), rank)
        return LayerBasis(U=U, eigenvalues=eigenvalues, query_mean=mean.float().cpu())

    def to_oblique_basis(self, errors: QueryMoments, rank: int) -> LayerBasis:
        """The score-optimal code for these queries and the key errors ``errors`` (see :func:`oblique_code`);
        ``eigenvalues`` keeps the query spectrum, as in a query basis."""
        second = self.second_moment().cpu()
        encoder, decoder, _ = oblique_code(second, errors.second_moment().cpu(), rank)
        _, eigenvalues = basis_from_second_moment(second, rank)
        return LayerBasis(U=encoder, eigenvalues=eigenvalues, query_mean=self.mean().float().cpu(), decoder=decoder)


class ChannelRanges:
    """Running ``Σ r²`` of each key channel's range ``r`` over whole blocks of ``block`` tokens, per KV head
    (float64; summed over processes like :class:`QueryMoments`)."""

    def __init__(self, kv_heads: int, head_dim: int, block: int, device: torch.device | str = "cpu") -> None:
        self.block = block
        self.sum_square = torch.zeros(kv_heads, head_dim, dtype=torch.float64, device=device)
        self.count = torch.zeros(kv_heads, dtype=torch.float64, device=device)

    def add(self, keys: torch.Tensor, heads: slice | None = None) -> None:
        """Add the whole blocks of keys ``[batch, kv_heads, tokens, head_dim]`` of KV heads ``heads``."""
        heads = slice(None) if heads is None else heads
        batch, kv_heads, tokens, head_dim = keys.shape
        whole = tokens - tokens % self.block
        if not whole:
            return
        k = keys[:, :, :whole].detach().to(self.sum_square.device, torch.float64)
        k = k.reshape(batch, kv_heads, whole // self.block, self.block, head_dim)
        ranges = k.amax(3) - k.amin(3)  # [batch, heads, blocks, head_dim]
        self.sum_square[heads] += (ranges**2).sum((0, 2))
        self.count[heads] += batch * (whole // self.block)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        for tensor in (self.sum_square, self.count):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def mean_square(self) -> torch.Tensor | None:
        """``E[r²]`` per KV head and channel, ``[H, D]``, or None if no whole block was seen."""
        if (self.count == 0).any():
            return None
        return self.sum_square / self.count[:, None]


def key_channel_weight(queries: QueryMoments, ranges: ChannelRanges) -> torch.Tensor | None:
    """``E[q_c²] E[r_c²]`` per KV head and channel (float32, CPU): see :mod:`.mixed_keys`."""
    mean_square = ranges.mean_square()
    if mean_square is None:
        return None
    query_power = torch.diagonal(queries.second_moment(), dim1=-2, dim2=-1)
    return (query_power * mean_square).float().cpu()


def _capture_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for observe in _observers:
        observe(int(cast(int, module.layer_idx)), query, key)
    if kwargs.get("softcap") is not None:  # sdpa cannot soft-cap logits (Gemma 2); the exact torch path can
        from .attention import headq_attention_forward

        return headq_attention_forward(module, query, key, *args, **kwargs)
    return sdpa_attention_forward(module, query, key, *args, **kwargs)


@contextlib.contextmanager
def observe_attention(model: Any, observer: AttentionObserver) -> Iterator[None]:
    """Within the block, call ``observer(layer_idx, query, key)`` at every attention call.

    ``query`` is ``[B, q_heads, T, D]`` and ``key`` ``[B, kv_heads, K, D]``, both after RoPE.
    The model's attention implementation is restored on exit.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTENTION, _capture_forward)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)
    previous = text_config(model.config)._attn_implementation or "sdpa"
    model.set_attn_implementation(CAPTURE_ATTENTION)
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)
        model.set_attn_implementation(previous)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def accumulate_moments(
    model: Any, batches: Iterable[torch.Tensor], progress: bool = False, key_quantizer: GroupQuantizer | None = None
) -> tuple[list[QueryMoments], list[QueryMoments], list[QueryMoments], list[ChannelRanges]]:
    """Per-layer query, key and key-error moments and key channel ranges over ``batches`` of token ids
    (``[B, T]``, no padding).

    Key errors ``k − Q(k)`` are those of ``key_quantizer`` over the whole blocks of each sequence (none
    without one): the oblique code (:func:`~transformers_headq.basis.oblique_code`) weighs them. Channel
    ranges are taken over its blocks (blocks of 64 tokens without one).

    Under ``torch.distributed`` each process passes its own share of batches; sums are all-reduced.
    On a tensor-parallel model the ranks of one model replica pass the same batches, each adds the
    KV heads it computes, and the all-reduce assembles every head: the basis is the full model's.
    """
    fp = model_fingerprint(model.config)
    device = next(model.parameters()).device
    devices = layer_devices(model)  # each layer's sums beside its layer: under device_map no query crosses GPUs
    shape = (fp["num_key_value_heads"], fp["head_dim"])
    queries = [QueryMoments(*shape, device=d) for d in devices]
    keys = [QueryMoments(*shape, device=d) for d in devices]
    errors = [QueryMoments(*shape, device=d) for d in devices] if key_quantizer else []
    block = key_quantizer.group if key_quantizer is not None and key_quantizer.grouping == "channel" else 64
    ranges = [ChannelRanges(*shape, block, device=d) for d in devices]

    heads = tensor_parallel_kv_heads(model)

    def observe(layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> None:
        queries[layer_idx].add(query, heads)
        keys[layer_idx].add(key, heads)
        ranges[layer_idx].add(key, heads)
        if key_quantizer is not None:
            errors[layer_idx].add(_key_error(key_quantizer, key), heads)

    items: Iterable[torch.Tensor] = batches
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(batches, desc="calibrating", unit="batch")
    with observe_attention(model, observe), torch.no_grad():
        for ids in items:
            model(input_ids=ids.to(device), use_cache=False)
    if _distributed():
        for moments in (*queries, *keys, *errors):
            moments.all_reduce()
        for channel_ranges in ranges:
            channel_ranges.all_reduce()
    return queries, keys, errors, ranges


def _key_error(quantizer: GroupQuantizer, keys: torch.Tensor) -> torch.Tensor:
    """``k − Q(k)`` over the whole quantization blocks of ``keys`` ``[B, H, T, D]`` (float32)."""
    tokens = keys.shape[2] - keys.shape[2] % quantizer.group if quantizer.grouping == "channel" else keys.shape[2]
    k = keys[:, :, :tokens].float()
    return k - quantizer.dequantize(quantizer.quantize(k), k.shape[-1], torch.float32)


def calibrate(
    model: Any,
    batches: Iterable[torch.Tensor],
    rank: int | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
    key_quantizer: GroupQuantizer | None = None,
) -> dict[str, QueryBasis]:
    """Calibrate a query basis (and the key-PCA control) on ``batches`` of token ids.

    Returns ``{"query": ..., "key-pca": ...}``, and with ``key_quantizer`` (the cache's key quantizer)
    also ``"oblique"``: the score-optimal code for that quantizer's errors (not when the windows are
    shorter than one of its blocks, which leaves no quantized key). ``rank`` defaults to the head
    dimension (pick a smaller rank later with :meth:`QueryBasis.with_rank` or the cache settings).
    """
    check_supported(model.config)
    fp = model_fingerprint(model.config)
    rank = fp["head_dim"] if rank is None else rank
    started = time.perf_counter()
    queries, keys, errors, ranges = accumulate_moments(model, batches, progress, key_quantizer)
    for device in {m.sum.device for m in queries if m.sum.is_cuda}:  # every GPU the layers use
        torch.cuda.synchronize(device)
    meta = dict(metadata or {})
    meta["calibration_seconds"] = round(time.perf_counter() - started, 3)  # forwards + all-reduce, not loading
    meta["calibration_tokens"] = int(
        queries[0].count[0].item() // (fp["num_attention_heads"] // fp["num_key_value_heads"])
    )
    weights = [key_channel_weight(q, r) for q, r in zip(queries, ranges, strict=True)]
    query_layers = [
        dataclasses.replace(m.to_layer_basis(rank), key_channel_weight=w) for m, w in zip(queries, weights, strict=True)
    ]
    bases = {
        "query": QueryBasis(query_layers, fp, meta, kind="query"),
        "key-pca": QueryBasis([m.to_layer_basis(rank, centered=True) for m in keys], fp, meta, kind="key-pca"),
    }
    if errors and all(bool((e.count > 0).all()) for e in errors):  # windows shorter than a block have no errors
        layers = [
            dataclasses.replace(q.to_oblique_basis(e, rank), key_channel_weight=w)
            for q, e, w in zip(queries, errors, weights, strict=True)
        ]
        bases[OBLIQUE] = QueryBasis(layers, fp, meta, kind=OBLIQUE)
    return bases
