"""What a query basis must agree on with a model: its attention shape and positional encoding.

A basis is learned on post-RoPE queries, so it is tied to the layer count, the head layout, the
head dimension and the rotary settings; anything else (weights fine-tuned, another checkpoint of
the same shape) is the user's call and only warned about.
"""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedModelError

# Model types whose attention calls `cache.update` with post-RoPE keys and then the registered
# attention function with the returned states, with a plain dot-product score. Tested in the suite.
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "phi3",
    "gpt_neox",
    "gpt2",
)

_ROPE_KEYS = ("rope_type", "rope_theta", "partial_rotary_factor", "factor")


def text_config(config: Any) -> Any:
    """The decoder config of a (possibly multimodal) model config."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


def _rope_settings(config: Any) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if getattr(config, "rope_theta", None) is not None:
        params.setdefault("rope_theta", config.rope_theta)
    if getattr(config, "partial_rotary_factor", None) is not None:
        params.setdefault("partial_rotary_factor", config.partial_rotary_factor)
    return {k: params[k] for k in _ROPE_KEYS if params.get(k) is not None}


def model_fingerprint(config: Any) -> dict[str, Any]:
    """The facts about a model config that a basis depends on, as plain JSON values."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    return {
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "rope": _rope_settings(cfg),
    }


def check_supported(config: Any) -> None:
    """Refuse a model whose attention HeadQ cannot correct, naming its type."""
    model_type = text_config(config).model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by HeadQ yet (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}). Its attention must take post-RoPE keys from "
            "cache.update and a dot-product score; please open an issue with the model id."
        )


def fingerprint_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable lines for each field in which two fingerprints disagree."""
    lines = []
    for key in ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rope"):
        if expected.get(key) != actual.get(key):
            lines.append(f"{key}: basis has {expected.get(key)!r}, model has {actual.get(key)!r}")
    return lines


def sliding_windows(config: Any) -> list[int | None]:
    """Per decoder layer, its sliding window in tokens, or ``None`` for a global layer.

    Follows ``config.layer_types`` where the config has it, else ``sliding_window`` for every layer,
    as transformers' own caches do. Chunked attention (Llama 4) is refused: its mask is not a window.
    """
    cfg = text_config(config)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    types = getattr(cfg, "layer_types", None)
    if types is None:
        chunked = getattr(cfg, "attention_chunk_size", None) is not None
        types = ["chunked_attention" if chunked else "sliding_attention" if window else "full_attention"]
        types = types * cfg.num_hidden_layers
    if "chunked_attention" in types:
        raise UnsupportedModelError(
            f"model type {cfg.model_type!r} uses chunked attention, which HeadQCache does not support yet"
        )
    return [window if kind == "sliding_attention" else None for kind in types]
