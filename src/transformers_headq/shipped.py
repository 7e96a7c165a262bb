"""Bases that ship with the package (``hub_artifacts/``), and resolving a ``--basis`` argument."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .basis import QueryBasis

SHIPPED = "shipped"
DEFAULT_BASIS = "smollm2-135m-instruct-shakespeare"


def shipped_path(name: str = DEFAULT_BASIS) -> Path:
    """Folder of a basis shipped in ``hub_artifacts/``."""
    return Path(str(files("transformers_headq.hub_artifacts") / name))


def resolve_basis(spec: str, control: str | None = None) -> QueryBasis:
    """Load ``spec`` (``"shipped"``, a folder or a Hub id); ``control`` names a sub-basis such as ``key-pca``."""
    if spec == SHIPPED:
        spec = str(shipped_path())
    return QueryBasis.from_pretrained(spec, subfolder=control)
