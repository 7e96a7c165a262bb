"""QueryBasis: per-layer query bases with their metadata, stored as safetensors + config.json.

For every layer and KV head the basis holds ``U`` ([kv_heads, head_dim, r], orthonormal columns:
the top-r eigenvectors of the pooled post-RoPE query second moment), the eigenvalues of that
moment ([kv_heads, head_dim], descending) and the query mean. The side code is ``c = Uᵀ e``
(``U`` is the *encoder*); the logit correction reads ``(q W)·ĉ`` with a *decoder* ``W`` that is
``U`` itself unless a basis says otherwise (the wrong-sign control stores ``-U``; an ``oblique`` basis
stores the score-optimal encoder and decoder of :func:`oblique_code`, and its ``U`` is not orthonormal).

Only safetensors are read, never pickles. This module knows nothing of caches or attention.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BasisFormatError, BasisMismatchError
from .fingerprint import fingerprint_differences, model_fingerprint

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "basis.safetensors"
_PER_LAYER = ("U", "eigenvalues", "query_mean")
OBLIQUE = "oblique"  # a basis whose U is the score-optimal encoder (not orthonormal) with its decoder


@dataclass
class LayerBasis:
    """One layer's tensors; ``decoder`` is ``None`` when it equals ``U``. ``key_channel_weight`` ``[H, D]``:
    what a unit of key quantization step costs in each channel's logit error, ``E[q_c²] E[r_c²]`` (``r``: the
    channel's range over a block), from which per-channel key widths are allocated (:mod:`.mixed_keys`);
    ``None`` in bases calibrated before it existed."""

    U: torch.Tensor
    eigenvalues: torch.Tensor
    query_mean: torch.Tensor
    decoder: torch.Tensor | None = None
    key_channel_weight: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.U.shape[-1]

    @property
    def decoder_or_u(self) -> torch.Tensor:
        return self.U if self.decoder is None else self.decoder


@dataclass
class QueryBasis:
    """Calibrated query bases for every attention layer of one model.

    Attributes:
        layers: one :class:`LayerBasis` per decoder layer.
        fingerprint: the model facts the basis depends on (see :func:`model_fingerprint`).
        metadata: calibration details (model id, corpus, token count, sequence length, ...).
        quantizer: the :class:`HeadQConfig` settings the basis was tuned for, as a dict.
        kind: ``"query"`` for a calibrated basis, or the name of a control.
        kv_heads: ``(start, stop)`` when the basis holds only those KV heads of the model (a
            tensor-parallel rank's share, see :meth:`for_kv_heads`); ``None`` for all of them.
    """

    layers: list[LayerBasis]
    fingerprint: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    quantizer: dict[str, Any] = field(default_factory=dict)
    kind: str = "query"
    kv_heads: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def rank(self) -> int:
        return max((layer.rank for layer in self.layers), default=0)

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Refuse inconsistent tensors: wrong shapes, non-float, non-finite, non-orthonormal U."""
        fp = self.fingerprint
        heads, head_dim = fp.get("num_key_value_heads"), fp.get("head_dim")
        if self.kv_heads is not None:
            start, stop = self.kv_heads
            if not (isinstance(heads, int) and 0 <= start < stop <= heads):
                raise BasisFormatError(f"KV heads {start}:{stop} are not a run of the model's {heads} heads")
            heads = stop - start
        if fp.get("num_hidden_layers") != len(self.layers):
            raise BasisFormatError(
                f"basis holds {len(self.layers)} layers but its fingerprint says {fp.get('num_hidden_layers')}"
            )
        for i, layer in enumerate(self.layers):
            expected = {
                "U": (heads, head_dim, layer.rank),
                "eigenvalues": (heads, head_dim),
                "query_mean": (heads, head_dim),
                "decoder": (heads, head_dim, layer.rank),
                "key_channel_weight": (heads, head_dim),
            }
            for name, shape in expected.items():
                t = getattr(layer, name)
                if t is None:
                    continue
                if tuple(t.shape) != shape:
                    raise BasisFormatError(f"layer {i} {name} has shape {tuple(t.shape)}, expected {shape}")
                if not t.is_floating_point():
                    raise BasisFormatError(f"layer {i} {name} has dtype {t.dtype}, expected a float dtype")
                if not torch.isfinite(t).all():
                    raise BasisFormatError(f"layer {i} {name} holds NaN or infinite values: the file is corrupt")
            if self.kind != OBLIQUE and orthonormality_error(layer.U) > 1e-3:
                raise BasisFormatError(f"layer {i} U does not have orthonormal columns: the file is corrupt")
            if self.kind == OBLIQUE and layer.decoder is None:
                raise BasisFormatError(f"layer {i} of an oblique basis has no decoder: the file is corrupt")

    def check_model(self, model_or_config: Any) -> None:
        """Raise :class:`BasisMismatchError` unless the basis fits this model (or config)."""
        config = getattr(model_or_config, "config", model_or_config)
        differences = fingerprint_differences(self.fingerprint, model_fingerprint(config))
        if differences:
            made_for = self.metadata.get("model_id", "another model")
            raise BasisMismatchError(
                f"this query basis was calibrated for {made_for} and does not fit the model:\n  "
                + "\n  ".join(differences)
                + "\nUse a basis calibrated for this model, or calibrate one with `headq calibrate`."
            )

    # ------------------------------------------------------------- variants
    def with_rank(self, rank: int) -> QueryBasis:
        """The leading ``rank`` directions of every layer (eigenvectors are sorted by eigenvalue)."""
        if rank > self.rank:
            raise ValueError(f"basis has rank {self.rank}; cannot raise it to {rank}")

        def cut(layer: LayerBasis) -> LayerBasis:
            dec = None if layer.decoder is None else layer.decoder[..., :rank]
            return dataclasses.replace(layer, U=layer.U[..., :rank], decoder=dec)

        return dataclasses.replace(self, layers=[cut(layer) for layer in self.layers])

    def for_kv_heads(self, heads: slice) -> QueryBasis:
        """The basis of KV heads ``heads`` only (``slice(start, stop)``): what a tensor-parallel rank
        that computes those heads uses. It still checks against the whole model's fingerprint."""
        if self.kv_heads is not None:
            raise ValueError(f"this basis already holds only KV heads {self.kv_heads}; slice the full basis")

        def cut(layer: LayerBasis) -> LayerBasis:
            dec = None if layer.decoder is None else layer.decoder[heads]
            weight = None if layer.key_channel_weight is None else layer.key_channel_weight[heads]
            return LayerBasis(layer.U[heads], layer.eigenvalues[heads], layer.query_mean[heads], dec, weight)

        return dataclasses.replace(
            self, layers=[cut(layer) for layer in self.layers], kv_heads=(heads.start, heads.stop)
        )

    def flipped(self) -> QueryBasis:
        """Control: the same side code applied with the wrong sign (decoder ``-U``)."""
        layers = [dataclasses.replace(layer, decoder=-layer.decoder_or_u) for layer in self.layers]
        return dataclasses.replace(self, layers=layers, kind="wrong-sign")

    @classmethod
    def random(cls, like: QueryBasis, seed: int = 0) -> QueryBasis:
        """Control: random orthonormal directions of the same rank (no calibration)."""
        gen = torch.Generator().manual_seed(seed)
        layers = []
        for layer in like.layers:
            h, d, r = layer.U.shape
            q, _ = torch.linalg.qr(torch.randn(h, d, d, generator=gen, dtype=torch.float64))
            layers.append(dataclasses.replace(layer, U=q[..., :r].float(), decoder=None))
        return dataclasses.replace(like, layers=layers, kind="random")

    # ------------------------------------------------------------------ I/O
    def config_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "library": "transformers-headq",
            "kind": self.kind,
            "rank": self.rank,
            "ranks": [layer.rank for layer in self.layers],
            "fingerprint": self.fingerprint,
            "metadata": self.metadata,
            "quantizer": self.quantizer,
        }

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``basis.safetensors`` into ``save_directory``."""
        if self.kv_heads is not None:
            raise ValueError(
                f"this basis holds only KV heads {self.kv_heads} (one tensor-parallel rank's share); save the full "
                "basis, which every rank slices when it builds its cache"
            )
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            for name in (*_PER_LAYER, "decoder", "key_channel_weight"):
                t = getattr(layer, name)
                if t is not None:
                    tensors[f"layers.{i}.{name}"] = t.detach().to("cpu", torch.float32).contiguous()
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt", "library": "transformers-headq"})
        (path / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike[str],
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        subfolder: str | None = None,
    ) -> QueryBasis:
        """Load a basis from a local folder, or from a Hub repo id into the standard HF cache.

        Hub downloads honour ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``; ``revision`` may be a branch,
        tag or commit hash. A download that is not a valid basis is removed from the cache.
        ``subfolder`` loads a sub-basis saved beside the basis (``key-pca``, ``oblique``: what
        ``headq calibrate`` writes and ``push_to_hub(extra_folders=...)`` uploads); one that is not
        there raises :class:`~transformers_headq.hub.BasisNotAvailableError`.
        """
        from .hub import BasisNotAvailableError, download_basis, load_downloaded

        path = Path(path_or_repo_id)
        if path.is_dir():
            if subfolder is not None and not (path / subfolder).is_dir():
                raise BasisNotAvailableError(f"the basis folder {str(path)!r} has no sub-basis {subfolder!r}")
            return cls.from_folder(path / (subfolder or ""))
        repo_id = str(path_or_repo_id)
        snapshot = download_basis(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
            subfolder=subfolder,
        )
        return load_downloaded(repo_id, snapshot, cache_dir, lambda root: cls.from_folder(root / (subfolder or "")))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        base_model: str | None = None,
        quality_rows: Iterable[Mapping[str, Any]] | None = None,
        extra_folders: Mapping[str, QueryBasis] | None = None,
        commit_message: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Upload this basis and a generated model card to ``repo_id`` in one commit.

        ``extra_folders`` adds sub-bases (e.g. ``{"key-pca": control}``) in the same commit; ``base_model`` and
        ``quality_rows`` go into the card. Other keywords are those of :func:`transformers_headq.hub.push_folder`
        (``private``, ``token``, ``branch``, ``create_pr``). Returns the ``CommitInfo``.
        """
        from .hub import push_folder
        from .model_card import basis_model_card

        def write(folder: Path) -> None:
            self.save_pretrained(folder)
            for name, sub in (extra_folders or {}).items():
                sub.save_pretrained(folder / name)
            basis_model_card(self, repo_id, base_model, quality_rows).save(folder / "README.md")

        message = commit_message or f"Upload HeadQ query basis ({self.metadata.get('model_id', 'model')})"
        return push_folder(write, repo_id, message, **kwargs)

    @classmethod
    def from_folder(cls, path: Path) -> QueryBasis:
        """Load and validate a basis folder (``config.json`` + ``basis.safetensors``)."""
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not weights_path.is_file():
            pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
            hint = f" It holds {pickles}: pickle files are never loaded, for safety." if pickles else ""
            raise BasisFormatError(
                f"no {WEIGHTS_NAME} in {path}.{hint} A basis is saved by QueryBasis.save_pretrained."
            )
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise BasisFormatError(f"no {CONFIG_NAME} in {path}: not a HeadQ basis folder") from None
        except json.JSONDecodeError as err:
            raise BasisFormatError(f"{config_path} is not valid JSON ({err}): the file is corrupt") from None
        version = config.get("format_version") if isinstance(config, dict) else None
        if version != FORMAT_VERSION:
            raise BasisFormatError(
                f"{config_path} has format_version {version!r}; this library reads version {FORMAT_VERSION}. "
                "Upgrade transformers-headq or re-save the basis."
            )
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise BasisFormatError(
                f"{weights_path} is not a readable safetensors file ({err}): the file is corrupt"
            ) from None
        fingerprint = config.get("fingerprint") or {}
        n_layers = fingerprint.get("num_hidden_layers")
        if not isinstance(n_layers, int):
            raise BasisFormatError(f"{config_path} has no fingerprint.num_hidden_layers: the file is corrupt")
        layers = []
        for i in range(n_layers):
            missing = [n for n in _PER_LAYER if f"layers.{i}.{n}" not in tensors]
            if missing:
                raise BasisFormatError(
                    f"{weights_path} lacks {missing} for layer {i}: the file is corrupt or truncated"
                )
            layers.append(
                LayerBasis(
                    U=tensors[f"layers.{i}.U"],
                    eigenvalues=tensors[f"layers.{i}.eigenvalues"],
                    query_mean=tensors[f"layers.{i}.query_mean"],
                    decoder=tensors.get(f"layers.{i}.decoder"),
                    key_channel_weight=tensors.get(f"layers.{i}.key_channel_weight"),
                )
            )
        return cls(
            layers=layers,
            fingerprint=fingerprint,
            metadata=config.get("metadata") or {},
            quantizer=config.get("quantizer") or {},
            kind=config.get("kind", "query"),
        )


def basis_from_second_moment(second_moment: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenvectors (``[H, D, rank]``) and all eigenvalues (``[H, D]``, descending).

    ``second_moment`` is ``E[q qᵀ]`` per KV head, ``[H, D, D]``; decomposed in float64. Eigenvector
    signs are fixed (largest-magnitude entry positive) so that equal inputs give equal files.
    """
    evals, evecs = torch.linalg.eigh(second_moment.double())
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    idx = evecs.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(evecs, -2, idx))
    evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    return evecs[..., :rank].float(), evals.clamp_min(0).float()


def _psd_roots(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``M^{1/2}`` and its pseudo-inverse for symmetric PSD ``[H, D, D]``, from one eigendecomposition
    (eigenvalues under 1e-10 of the largest treated as zero), in float64."""
    evals, evecs = torch.linalg.eigh(moment.double())
    keep = evals > 1e-10 * evals.amax(-1, keepdim=True).clamp_min(1e-300)
    root = evals.clamp_min(0).sqrt()
    inverse = torch.where(keep, 1 / root.clamp_min(1e-300), torch.zeros_like(root))

    def rebuild(values: torch.Tensor) -> torch.Tensor:
        return evecs @ torch.diag_embed(values) @ evecs.transpose(-1, -2)

    return rebuild(root * keep), rebuild(inverse)


def oblique_code(
    query_moment: torch.Tensor, error_moment: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score-optimal side code: encoder ``A`` and decoder ``W`` (``[H, D, rank]``) minimising
    ``E_q E_e (q·(e − W Aᵀ e))²`` over rank-``rank`` codes, and the singular values ``[H, D]``.

    With ``L = Σ_q^{1/2}`` and ``R = Σ_e^{1/2}`` the objective is ``‖L (I − W Aᵀ) R‖²``, so ``L W Aᵀ R``
    is the best rank-``rank`` approximation of ``L R`` (an SVD ``P S Vᵀ``): ``W = L⁺ P_r`` and
    ``Aᵀ = S_r V_rᵀ R⁺``. Each decoder column then costs the score error of a unit code error equally
    (``Wᵀ Σ_q W = I``), and the columns are ordered by singular value, so the first ``r`` of a solution
    are the rank-``r`` solution (:meth:`QueryBasis.with_rank` stays optimal). Where the key error is
    isotropic this is the query eigenbasis (up to scale); where some channels err more (per-channel key
    quantization) it leans towards them.
    """
    (q_root, q_inverse), (e_root, e_inverse) = _psd_roots(query_moment), _psd_roots(error_moment)
    left, singular, right_t = torch.linalg.svd(q_root @ e_root)
    decoder = q_inverse @ left[..., :rank]
    encoder = e_inverse @ right_t.transpose(-1, -2)[..., :rank] * singular[..., None, :rank]
    # the sign of each (encoder, decoder) pair is free: fix it as basis_from_second_moment does
    idx = decoder.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(decoder, -2, idx))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (encoder * signs).float(), (decoder * signs).float(), singular.float()


def orthonormality_error(U: torch.Tensor) -> float:
    """Largest deviation of ``Uᵀ U`` from the identity (a diagnostic for tests and users)."""
    gram = U.double().transpose(-1, -2) @ U.double()
    return float((gram - torch.eye(U.shape[-1], dtype=torch.float64)).abs().max()) if U.shape[-1] else 0.0
