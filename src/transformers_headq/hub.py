"""Sharing query bases on the Hugging Face Hub: download into the standard cache, push one commit.

Built on ``huggingface_hub``'s helpers (``snapshot_download``, ``HfApi.create_repo`` and
``upload_folder``), so ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and tokens from
``hf auth login`` behave as in every other Hub library. (``ModelHubMixin`` was not used: it writes
its own ``config.json`` and injects config keys into the constructor, which fights the basis's own
format and validation.)

Safety: only ``basis.safetensors``, ``config.json`` and ``README.md`` are ever downloaded, so a
pickle in a repo is never fetched, let alone loaded. A download that does not load as a valid
basis (truncated, tampered, wrong format) is removed from the cache before the error is raised,
so no half-usable basis stays behind to be picked up offline later.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import BasisFormatError

Loaded = TypeVar("Loaded")

BASIS_FILES = ["basis.safetensors", "config.json", "README.md"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class BasisNotAvailableError(BasisFormatError):
    """A basis could not be fetched: unknown repo or revision, no network, or not in the offline cache."""


def download_basis(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    subfolder: str | None = None,
) -> Path:
    """Fetch a basis repo's files into the HF cache and return the snapshot folder; with ``subfolder``, only that
    sub-basis's files (uploaded beside the basis), and it must be there.

    ``revision`` may be a branch, a tag or a commit hash (pin a hash for reproducible runs).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=None if cache_dir is None else Path(cache_dir),
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
            allow_patterns=[f"{subfolder}/{name}" for name in BASIS_FILES] if subfolder else BASIS_FILES,
            library_name="transformers-headq",
        )
    except HFValidationError:
        raise BasisNotAvailableError(
            f"{repo_id!r} is neither a local basis folder nor a valid Hub repo id (like 'org/name')"
        ) from None
    except RevisionNotFoundError:
        raise BasisNotAvailableError(f"the Hub repo {repo_id!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise BasisNotAvailableError(
            f"no Hub repo {repo_id!r} (or it is private: pass token=... or run `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        raise BasisNotAvailableError(
            f"the basis {where} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE=1, local_files_only=True, or no network). Download it once while online "
            f"(`headq pull {repo_id}`), or pass a local basis folder."
        ) from None
    path = Path(folder)
    if subfolder:
        if not (path / subfolder / "basis.safetensors").is_file():  # the repo's basis itself may be fine
            raise BasisNotAvailableError(f"the basis {where} has no sub-basis {subfolder!r}")
        return path
    if not (path / "basis.safetensors").is_file():
        _forget(repo_id, path, cache_dir)
        raise BasisFormatError(_missing_weights_message(repo_id, revision, token, local_files_only))
    return path


def load_downloaded(
    repo_id: str, path: Path, cache_dir: str | os.PathLike[str] | None, load: Callable[[Path], Loaded]
) -> Loaded:
    """``load(path)`` of a downloaded snapshot; if it is not a valid basis (``load`` raises
    :class:`BasisFormatError`), drop it from the cache and say so."""
    try:
        return load(path)
    except BasisFormatError as err:
        _forget(repo_id, path, cache_dir)
        raise BasisFormatError(
            f"the basis downloaded from {repo_id!r} is invalid and was removed from the cache: {err}"
        ) from None


def _missing_weights_message(repo_id: str, revision: str | None, token: str | bool | None, offline: bool) -> str:
    message = f"the Hub repo {repo_id!r} holds no basis.safetensors: it is not a HeadQ query basis."
    if offline or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return message
    try:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
        pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    except Exception:  # the listing is only a hint
        return message
    if pickles:
        message += f" It holds {pickles}: pickle files are never downloaded or loaded, for safety."
    return message


def _forget(repo_id: str, snapshot: Path, cache_dir: str | os.PathLike[str] | None) -> None:
    """Delete one downloaded revision (snapshot links and blobs) through the cache's own API."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(None if cache_dir is None else Path(cache_dir))
    except Exception:  # not a standard cache layout: nothing of ours to clean
        return
    revisions = [
        rev.commit_hash
        for repo in info.repos
        if repo.repo_id == repo_id and repo.repo_type == "model"
        for rev in repo.revisions
        if rev.snapshot_path.resolve() == snapshot.resolve()
    ]
    if revisions:
        info.delete_revisions(*revisions).execute()


def push_folder(
    write: Callable[[Path], None],
    repo_id: str,
    commit_message: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Create ``repo_id`` if needed and upload, in one commit, the folder that ``write(folder)`` fills.

    Returns the ``huggingface_hub.CommitInfo`` (its ``oid`` is the commit hash to pin).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write(folder)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=branch, create_pr=create_pr
        )
