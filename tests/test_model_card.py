"""Basis model cards carry the Hub metadata and the measured quality."""

from __future__ import annotations

from huggingface_hub import ModelCard
from typer.testing import CliRunner

from transformers_headq.cli import app
from transformers_headq.model_card import basis_model_card

from .helpers import random_basis, tiny_model

ROW = {
    "model": "tiny",
    "corpus": "hf:wikitext:wikitext-2-raw-v1",
    "mode": "k-only",
    "method": "headq",
    "setting": "K2/channel r8 s4/block",
    "key_bits": 3.0625,
    "value_bits": 16.0,
    "ppl": 12.5,
    "tokens": 2048,
}


def test_card_metadata_and_quality():
    basis = random_basis(tiny_model(), rank=4)
    basis.metadata.update(corpus="hf:wikitext:wikitext-2-raw-v1", calibration_tokens=4096, sequence_length=512)
    card = basis_model_card(basis, "org/tiny-basis", base_model="org/tiny", quality_rows=[ROW])
    reread = ModelCard(str(card))
    assert reread.data.library_name == "transformers-headq"
    assert reread.data.base_model == "org/tiny"
    assert reread.data.license == "apache-2.0"
    assert reread.data.datasets == ["wikitext"]
    assert "headq" in reread.data.tags
    assert "| k-only | headq | K2/channel r8 s4/block | 3.062 | 16.000 | 12.500 |" in reread.text
    assert "4096 tokens in windows of 512" in reread.text
    assert 'HeadQCache.from_pretrained("org/tiny-basis", model=model)' in reread.text


def test_card_command_writes_readme(tmp_path):
    basis = random_basis(tiny_model(), rank=4)
    basis.save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["card", str(tmp_path), "--repo-id", "org/x"])
    assert result.exit_code == 0, result.output
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers-headq" and "No quality measurement" in card.text
