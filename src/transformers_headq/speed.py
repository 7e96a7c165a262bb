"""Whole-model decode speed of HeadQ against transformers' own caches, on the user's model and device.

Each cache is filled with ``context`` random key/value states a sequence for every layer (timing does
not depend on their values, and a real prefill of a long batch would only measure prefill), then the
model decodes one token a sequence per step. Reported per cache: wall time per step (mean and median,
each step followed by a synchronisation, as a generation loop waits for its token), tokens per second,
the GPU's busy time in one step (CUDA only: the sum of its kernel times, which is what the step costs the
device where the host keeps up), peak GPU memory (of the fullest GPU, where ``device_map`` spreads the model)
and KV bytes per token (a tensor-parallel rank's: its share of the KV heads).

Caches: ``dynamic`` (``DynamicCache`` with the model's sdpa attention, the backend torch picks),
``dynamic-flash`` (the same, sdpa limited to its flash backend; CUDA only), ``quanto`` (transformers'
``QuantizedCache``, 2-bit, which dequantizes everything it holds at every step), ``headq`` (the growing
HeadQ cache, eager), and the compiled rows, CUDA only: ``static-compiled`` (transformers' ``StaticCache``
with ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``, its documented fast path)
and ``headq-compiled`` (HeadQ with a fixed capacity, compiled the same way; on a CPU, compiled without
CUDA graphs). Compiled rows size their cache for the context and the steps, and compile in the
warm-up steps (so the first compiled row of a run takes minutes).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .fingerprint import model_fingerprint, text_config
from .loading import cache_kwargs
from .parallel import layer_devices, tensor_parallel_kv_heads

CACHE_KINDS = ("dynamic", "dynamic-flash", "static-compiled", "quanto", "headq", "headq-compiled")
COMPILED_KINDS = ("static-compiled", "headq-compiled")
_FILL_CHUNK = 4096  # tokens a fill step appends: bounds the temporary states of long contexts


@dataclass
class DecodeSpeed:
    """One cache's decode speed at one (context, batch)."""

    cache: str
    context: int
    batch: int
    steps: int
    ms_per_step: float
    ms_median: float
    tokens_per_s: float
    slowest_warmup_ms: float
    kv_bytes_per_token: float  # all layers, keys and values, everything stored counted
    gpu_busy_ms: float | None = None
    peak_gib: float | None = None  # the fullest of the model's GPUs: what must fit on one
    cache_gib: float | None = None  # bytes the cache's tensors take (allocated: spare capacity included)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_decode_speed(
    model: Any,
    make_cache: Callable[[], Any],
    cache_name: str,
    *,
    batch: int,
    context: int,
    steps: int,
    warmup: int,
    sdpa_flash: bool = False,
    compiled: bool = False,
    profile: Callable[[Callable[[], None]], None] | None = None,
) -> DecodeSpeed:
    """Fill a fresh cache from ``make_cache`` and time ``steps`` decode steps after ``warmup`` untimed ones.

    ``warmup`` should reach past HeadQ's first block flush (``block_size + 2`` steps): a cache filled to
    exactly its stores' capacity doubles them there, a one-off copy reported as ``slowest_warmup_ms``.
    ``sdpa_flash`` limits sdpa to its flash backend. ``profile``, if given, is called with the step function
    after the timed steps (to profile one more step). ``compiled``: decode through
    ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`` (a fixed-capacity cache),
    positions passed as a tensor, compiled (and its CUDA graph recorded) in the warm-up steps.
    """
    device = model.device
    cuda = device.type == "cuda"
    gpus = list(dict.fromkeys(d for d in [device, *layer_devices(model)] if d.type == "cuda"))  # device_map: several
    if gpus:
        torch.cuda.empty_cache()
    for gpu in gpus:
        torch.cuda.reset_peak_memory_stats(gpu)
    cache = make_cache()
    fill_with_random_states(model, cache, batch, context)
    kv_bytes = _kv_bytes_per_token(cache, model, batch * context)
    cache_gib = _allocated_bytes(cache) / 2**30
    seeded = torch.Generator().manual_seed(0)  # every tensor-parallel rank must feed the same tokens
    token = torch.randint(0, text_config(model.config).vocab_size, (batch, 1), generator=seeded).to(device)

    cache_kwarg = cache_kwargs(model, cache)
    forward = model
    if compiled:
        torch._dynamo.reset()  # one compiled forward per cache kind
        mode = "reduce-overhead" if cuda else None  # CUDA graphs on the GPU; inductor's kernels alone on CPU
        forward = torch.compile(model.forward, mode=mode, fullgraph=True)
    position = [context]

    def step() -> None:
        positions = torch.full((batch, 1), position[0], device=device, dtype=torch.long)
        forward(input_ids=token, position_ids=positions, use_cache=True, **cache_kwarg)
        position[0] += 1
        for gpu in gpus:  # a step ends when its last layer's GPU is done
            torch.cuda.synchronize(gpu)

    with torch.no_grad(), sdpa_backend(sdpa_flash):
        warm = [_seconds(step) for _ in range(warmup)]
        times = [_seconds(step) for _ in range(steps)]
        busy = _gpu_busy_ms(step) if cuda else None
        if profile is not None:
            profile(step)
    mean = statistics.fmean(times)
    return DecodeSpeed(
        cache=cache_name,
        context=context,
        batch=batch,
        steps=steps,
        ms_per_step=mean * 1e3,
        ms_median=statistics.median(times) * 1e3,
        tokens_per_s=batch / mean,
        slowest_warmup_ms=max(warm, default=0.0) * 1e3,
        kv_bytes_per_token=kv_bytes,
        gpu_busy_ms=busy,
        peak_gib=max(torch.cuda.max_memory_allocated(gpu) for gpu in gpus) / 2**30 if gpus else None,
        cache_gib=cache_gib,
    )


def compare_decode_speed(
    model: Any,
    headq_cache: Callable[..., Any],
    *,
    batch: int,
    context: int,
    steps: int = 32,
    warmup: int | None = None,
    caches: tuple[str, ...] = CACHE_KINDS,
    block_size: int = 64,
    on_skip: Callable[[str, str], None] = lambda name, why: None,
) -> list[DecodeSpeed]:
    """Decode speed of each of ``caches`` on ``model``; ``headq_cache`` makes HeadQ's (a ``HeadQCacheFactory``).

    The baselines run first with the model on sdpa; caches that cannot run here (``dynamic-flash`` off CUDA,
    ``quanto`` without optimum-quanto) are reported to ``on_skip(name, why)`` and left out.
    """
    check_cache_kinds(caches)
    warmup = block_size + 2 if warmup is None else warmup
    rows = []
    for name in sorted(caches, key=CACHE_KINDS.index):
        why = _cannot_run(name, model.device)
        if why:
            on_skip(name, why)
            continue
        capacity = context + warmup + steps + 2  # the fill, every step, and the profiled one
        if name.startswith("headq"):
            from .attention import enable_headq_attention

            enable_headq_attention(model)
            make = headq_cache if name == "headq" else functools.partial(headq_cache, max_cache_len=capacity)
        else:
            model.set_attn_implementation("sdpa")
            make = _baseline_factory(name, model, capacity)
        flash = name == "dynamic-flash"  # a static cache's capacity-wide mask rules the flash backend out
        try:
            rows.append(
                measure_decode_speed(
                    model,
                    make,
                    name,
                    batch=batch,
                    context=context,
                    steps=steps,
                    warmup=warmup,
                    sdpa_flash=flash,
                    compiled=name in COMPILED_KINDS,
                )  # fmt: skip
            )
        except torch.OutOfMemoryError as error:  # a row that does not fit this GPU: say so, keep the others
            on_skip(f"{name} {context}x{batch}", f"out of memory ({str(error).splitlines()[0]})")
            torch.cuda.empty_cache()
    return rows


def check_cache_kinds(caches: tuple[str, ...]) -> None:
    """Refuse cache names this module does not know, naming them and the known ones."""
    unknown = set(caches) - set(CACHE_KINDS)
    if unknown:
        raise ValueError(f"unknown caches {sorted(unknown)}: choose from {', '.join(CACHE_KINDS)}")


def fill_with_random_states(model: Any, cache: Any, batch: int, context: int) -> None:
    """Append ``context`` random tokens a sequence to every layer of ``cache``, in chunks, as a prefill would.

    Keys get per-channel scales from 0.3 to 4 (the channel outliers real keys have), values are standard
    normal; both in the model's dtype. Each layer's states are made where its attention runs: on its own
    device (``device_map`` spreads layers over GPUs) and with this process's KV heads (a tensor-parallel
    rank computes a share of them), so the cache holds what a real prefill would have given it.
    """
    fp = model_fingerprint(model.config)
    shape = (batch, local_kv_heads(model), fp["head_dim"])
    dtype = model.dtype
    for layer, device in enumerate(layer_devices(model)):
        channel_scale = torch.linspace(0.3, 4.0, shape[2], device=device, dtype=dtype)
        for n in _chunks(context):
            keys = torch.randn(shape[0], shape[1], n, shape[2], device=device, dtype=dtype) * channel_scale
            values = torch.randn(shape[0], shape[1], n, shape[2], device=device, dtype=dtype)
            cache.update(keys, values, layer)


def local_kv_heads(model: Any) -> int:
    """KV heads this process's attention computes: all of them, or a tensor-parallel rank's share."""
    heads = tensor_parallel_kv_heads(model)
    return model_fingerprint(model.config)["num_key_value_heads"] if heads is None else heads.stop - heads.start


def markdown_table(rows: list[DecodeSpeed]) -> str:
    """Rows as a markdown table, with ratios to ``dynamic`` (and ``dynamic-flash``) of the same shape."""
    columns = ["cache", "context", "batch", "ms/step", "median ms", "tokens/s", "vs dynamic", "vs dynamic-flash"]
    columns += ["GPU busy ms/step", "peak GiB", "KV bytes/token", "slowest warm-up ms"]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for r in rows:
        ratios = []
        for base_name in ("dynamic", "dynamic-flash"):
            base = next((b for b in rows if (b.cache, b.context, b.batch) == (base_name, r.context, r.batch)), None)
            ratios.append("-" if base is None else f"{r.tokens_per_s / base.tokens_per_s:.2f}x")
        busy = "-" if r.gpu_busy_ms is None else f"{r.gpu_busy_ms:.1f}"
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.1f}"
        lines.append(
            f"| {r.cache} | {r.context} | {r.batch} | {r.ms_per_step:.1f} | {r.ms_median:.1f} | "
            f"{r.tokens_per_s:.1f} | {ratios[0]} | {ratios[1]} | {busy} | {peak} | {r.kv_bytes_per_token:.0f} | "
            f"{r.slowest_warmup_ms:.0f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------ helpers
def _chunks(total: int) -> Iterator[int]:
    done = 0
    while done < total:
        n = min(_FILL_CHUNK, total - done)
        yield n
        done += n


def _seconds(step: Callable[[], None]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def _gpu_busy_ms(step: Callable[[], None]) -> float:
    """Sum of the kernel times of one step (torch profiler, CUDA activity only)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as busy:
        step()
    return sum(e.self_device_time_total for e in busy.key_averages()) / 1e3


def sdpa_backend(flash: bool) -> contextlib.AbstractContextManager[None]:
    """sdpa limited to its flash backend, or torch's own choice."""
    if not flash:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def _cannot_run(name: str, device: torch.device) -> str | None:
    """Why cache ``name`` cannot be measured on ``device`` (``None``: it can)."""
    if name == "dynamic-flash" and device.type != "cuda":
        return "sdpa's flash backend needs a CUDA device"
    if name == "quanto":
        import importlib.util

        if importlib.util.find_spec("optimum.quanto") is None:
            return "needs optimum-quanto: pip install 'transformers-headq[baselines]'"
    return None


def _baseline_factory(name: str, model: Any, capacity: int) -> Callable[[], Any]:
    from transformers import DynamicCache, StaticCache

    if name == "quanto":
        from .evaluate import quanto_cache  # the quanto settings the quality evaluation uses

        return functools.partial(quanto_cache, model, 2)
    if name == "static-compiled":
        return functools.partial(StaticCache, config=model.config, max_cache_len=capacity)
    return DynamicCache


def _kv_bytes_per_token(cache: Any, model: Any, tokens: int) -> float:
    """Bytes a filled cache holds for keys and values a token (batch x context of them), all layers."""
    from .cache import HeadQCache

    if isinstance(cache, HeadQCache):
        return cache.memory_bytes() / tokens
    if type(cache).__name__ == "StaticCache":  # allocated for its capacity; count the filled tokens
        fp = model_fingerprint(model.config)
        return 2 * fp["num_hidden_layers"] * local_kv_heads(model) * fp["head_dim"] * model.dtype.itemsize
    if hasattr(cache.layers[0], "_quantized_keys"):  # quanto: codes, group scales and shifts, residual
        from .evaluate import quanto_bits_per_element

        fp = model_fingerprint(model.config)
        key_bits, value_bits = quanto_bits_per_element(cache)
        return fp["num_hidden_layers"] * fp["num_key_value_heads"] * fp["head_dim"] * (key_bits + value_bits) / 8
    dense = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return dense / tokens


def _allocated_bytes(cache: Any) -> int:
    """Bytes of every tensor a filled cache holds (HeadQ: its stores' whole allocation)."""
    from .cache import HeadQCache

    if isinstance(cache, HeadQCache):
        return cache.allocated_bytes()
    tensors = [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def plot_decode_speed(rows: list[DecodeSpeed], path: str) -> None:
    """Tokens/s against context, one line per (cache, batch), beside KV bytes per token per cache (log axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    caches = list(dict.fromkeys(r.cache for r in rows))
    for cache in caches:
        for batch in sorted({r.batch for r in rows if r.cache == cache}):
            line = sorted((r for r in rows if (r.cache, r.batch) == (cache, batch)), key=lambda r: r.context)
            speed_ax.plot([r.context for r in line], [r.tokens_per_s for r in line], marker="o",
                          label=f"{cache}, batch {batch}")  # fmt: skip
    bytes_per_cache = [statistics.fmean(r.kv_bytes_per_token for r in rows if r.cache == c) for c in caches]
    bytes_ax.bar(caches, bytes_per_cache, color="tab:blue")
    speed_ax.set(xscale="log", yscale="log", xlabel="context (tokens a sequence)", ylabel="decode tokens/s")
    speed_ax.legend(fontsize=8)
    bytes_ax.set(yscale="log", ylabel="KV bytes per token (all layers)", title="cache size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
