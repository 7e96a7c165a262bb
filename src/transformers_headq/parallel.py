"""Where a model's work runs: which KV heads this process computes (tensor parallelism slices them), and on
which device each decoder layer sits (``device_map`` spreads them).

Under ``from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))`` (or the older
``tp_plan="auto"``) transformers splits each ``k_proj``/``v_proj`` column-wise over the ranks of its
tensor-parallel mesh, so a rank's attention sees a contiguous run of the KV heads. A HeadQ cache on
that rank must use the same run of the basis' heads, and calibration must put each rank's
statistics at those heads before summing over ranks.

Everything here is read from the model, never guessed: its tensor-parallel size, its plan's entry
for ``k_proj`` and ``v_proj``, its device mesh (for the rank), and the local width of ``k_proj``'s
weight (a check that the split is the one the plan names).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import UnsupportedModelError
from .fingerprint import model_fingerprint

# Plan styles that split a projection's output features into contiguous per-rank chunks in rank order.
_COLUMN_SPLITS = ("colwise", "colwise_gather_output", "local_colwise")


def _plan_style(plan: dict[str, Any], projection: str) -> str | None:
    styles = {str(style) for key, style in plan.items() if key.endswith(f"self_attn.{projection}")}
    if len(styles) > 1:
        raise UnsupportedModelError(
            f"the tensor-parallel plan splits {projection} in several ways ({sorted(styles)}): HeadQ needs one"
        )
    return styles.pop() if styles else None


def _tensor_parallel_rank(model: Any) -> int:
    mesh = getattr(model, "_device_mesh", None) or getattr(model, "device_mesh", None)
    if mesh is None:
        raise UnsupportedModelError(
            "the model is tensor-parallel but carries no device mesh to read its rank from; load it with "
            "from_pretrained(..., distributed_config=DistributedConfig(tp_plan='auto')) under torchrun"
        )
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if mesh.ndim > 1:
        if "tp" not in names:
            raise UnsupportedModelError(f"the model's device mesh has dimensions {names} but none named 'tp'")
        mesh = mesh["tp"]
    return int(mesh.get_local_rank())


def _local_rows(weight: Any) -> int:
    """Output features this rank holds of a (possibly DTensor) projection weight."""
    to_local = getattr(weight, "to_local", None)
    return int((to_local() if callable(to_local) else weight).shape[0])


def _first_key_projection(model: Any) -> Any | None:
    for name, module in model.named_modules():
        if name.endswith("self_attn.k_proj") and hasattr(module, "weight"):
            return module.weight
    return None


def tensor_parallel_kv_heads(model: Any) -> slice | None:
    """The KV heads this process computes of a tensor-parallel ``model`` (``None``: all of them).

    Raises :class:`UnsupportedModelError` when the split is one HeadQ cannot follow (a KV-head count
    the ranks do not divide, a plan that splits ``k_proj`` other than by columns)."""
    size = int(getattr(model, "tp_size", None) or 1)
    if size <= 1:
        return None
    plan = dict(getattr(model, "tp_plan", None) or {})
    styles = {projection: _plan_style(plan, projection) for projection in ("k_proj", "v_proj")}
    if styles["k_proj"] is None and styles["v_proj"] is None:
        return None  # KV projections replicated: every rank computes every head
    if styles["k_proj"] != styles["v_proj"] or styles["k_proj"] not in _COLUMN_SPLITS:
        raise UnsupportedModelError(
            f"the tensor-parallel plan splits k_proj as {styles['k_proj']!r} and v_proj as {styles['v_proj']!r}; "
            f"HeadQ follows column splits ({', '.join(_COLUMN_SPLITS)}) of both"
        )
    fp = model_fingerprint(model.config)
    heads, head_dim = fp["num_key_value_heads"], fp["head_dim"]
    if heads % size:
        raise UnsupportedModelError(
            f"{heads} KV heads cannot be split evenly over {size} tensor-parallel ranks: use a tp_size that divides "
            f"{heads}"
        )
    per_rank = heads // size
    weight = _first_key_projection(model)
    if weight is not None and _local_rows(weight) != per_rank * head_dim:
        raise UnsupportedModelError(
            f"k_proj holds {_local_rows(weight)} output features on this rank, not the {per_rank} x {head_dim} "
            "of a column split: HeadQ cannot tell which KV heads this rank computes"
        )
    rank = _tensor_parallel_rank(model)
    return slice(rank * per_rank, (rank + 1) * per_rank)


def layer_devices(model: Any) -> list[torch.device]:
    """The device of each decoder layer's weights, in layer order (``device_map`` may spread them).

    Models whose decoder holds no ``layers`` list of one module a layer fall back to ``model.device``."""
    count = model_fingerprint(model.config)["num_hidden_layers"]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) != count:
        return [model.device] * count
    return [next(layer.parameters()).device for layer in layers]
