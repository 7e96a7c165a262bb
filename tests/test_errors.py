"""Bad input gets a clear error that says what to do."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from transformers_headq import (
    BasisFormatError,
    BasisMismatchError,
    CacheInputError,
    HeadQCache,
    HeadQConfig,
    QueryBasis,
    UnsupportedModelError,
)

from .helpers import random_basis, tiny_model


@pytest.fixture
def saved_basis(tmp_path):
    model = tiny_model()
    path = random_basis(model, 4).save_pretrained(tmp_path / "basis")
    return model, path


def test_round_trip(saved_basis):
    model, path = saved_basis
    loaded = QueryBasis.from_pretrained(path)
    original = random_basis(model, 4)
    for a, b in zip(loaded.layers, original.layers, strict=True):
        assert torch.equal(a.U, b.U)
    assert loaded.fingerprint == original.fingerprint
    cache = HeadQCache.from_pretrained(path, model=model, key_bits=3)
    assert cache.config.key_bits == 3 and model.config._attn_implementation == "headq"


@pytest.mark.parametrize("change", [{"layers": 3}, {"num_key_value_heads": 1}, {"head_dim": 32}])
def test_basis_for_another_model_is_refused(saved_basis, change):
    _, path = saved_basis
    kwargs = {"layers": change.get("layers", 2)}
    other = tiny_model(**kwargs)
    if "num_key_value_heads" in change:
        other.config.num_key_value_heads = 1
    if "head_dim" in change:
        other.config.head_dim = 32
    with pytest.raises(BasisMismatchError, match="does not fit the model") as info:
        HeadQCache.from_pretrained(path, model=other)
    assert "headq calibrate" in str(info.value)


def test_rope_mismatch_is_refused(saved_basis):
    _, path = saved_basis
    other = tiny_model()
    other.config.rope_parameters = {**(other.config.rope_parameters or {}), "rope_theta": 1234.0}
    with pytest.raises(BasisMismatchError, match="rope"):
        HeadQCache.from_pretrained(path, model=other)


def test_unsupported_model_type_is_named():
    """Bloom adds ALiBi biases to the scores: not a plain dot-product attention HeadQ can correct."""
    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="'bloom'"):
        HeadQCache.from_pretrained("unused", model=model)


def test_truncated_safetensors_is_refused(saved_basis):
    _, path = saved_basis
    weights = path / "basis.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(BasisFormatError, match="corrupt"):
        QueryBasis.from_pretrained(path)


def test_pickle_only_folder_is_refused(saved_basis):
    _, path = saved_basis
    (path / "basis.safetensors").unlink()
    torch.save({"U": torch.eye(2)}, path / "basis.bin")
    with pytest.raises(BasisFormatError, match="pickle files are never loaded"):
        QueryBasis.from_pretrained(path)


def test_tampered_config_is_refused(saved_basis):
    _, path = saved_basis
    config = json.loads((path / "config.json").read_text())
    config["fingerprint"]["head_dim"] = 32
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BasisFormatError, match="shape"):
        QueryBasis.from_pretrained(path)
    config["format_version"] = 99
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BasisFormatError, match="format_version 99"):
        QueryBasis.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(BasisFormatError, match="not valid JSON"):
        QueryBasis.from_pretrained(path)


def test_non_finite_basis_is_refused(saved_basis):
    from safetensors.torch import load_file, save_file

    _, path = saved_basis
    tensors = load_file(str(path / "basis.safetensors"))
    tensors["layers.0.eigenvalues"][0, 0] = float("nan")
    save_file(tensors, str(path / "basis.safetensors"))
    with pytest.raises(BasisFormatError, match="NaN"):
        QueryBasis.from_pretrained(path)


def test_wrong_dtype_and_device_are_refused():
    cache = HeadQCache(config=HeadQConfig(key_bits=2, rank=0), num_layers=1)
    with pytest.raises(CacheInputError, match="float32, float16, bfloat16"):
        cache.update(torch.randn(1, 2, 3, 8, dtype=torch.float64), torch.randn(1, 2, 3, 8, dtype=torch.float64), 0)
    cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 0)
    with pytest.raises(CacheInputError, match="fresh cache"):
        cache.update(torch.randn(1, 2, 1, 8, dtype=torch.float16), torch.randn(1, 2, 1, 8, dtype=torch.float16), 0)
    with pytest.raises(CacheInputError, match="on meta"):
        cache.update(torch.randn(1, 2, 1, 8, device="meta"), torch.randn(1, 2, 1, 8, device="meta"), 0)
    with pytest.raises(CacheInputError, match="fresh cache"):
        cache.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), 0)


def test_basis_with_wrong_head_shape_is_refused_at_update():
    model = tiny_model()
    cache = HeadQCache(random_basis(model, 4))
    with pytest.raises(CacheInputError, match="wrong basis"):
        cache.update(torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16), 0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="key_bits"):
        HeadQConfig(key_bits=5)
    with pytest.raises(TypeError, match="unknown HeadQConfig settings"):
        HeadQConfig().replace(keybits=2)
    with pytest.raises(CacheInputError, match="needs a query basis"):
        HeadQCache(config=HeadQConfig(rank=4), num_layers=1)
    with pytest.raises(ValueError, match="cannot raise"):
        HeadQCache(random_basis(tiny_model(), 4), rank=8)


@pytest.mark.parametrize("case", ["missing basis", "basis of another model"])
def test_the_command_line_ends_bad_input_with_its_message_not_a_traceback(tmp_path, case):
    """``headq``: a library error on bad input prints one clear message on stderr and exits with status 2."""
    import subprocess
    import sys

    from .helpers import save_tiny_model_folder

    save_tiny_model_folder(tmp_path / "llama", "a b c d e f")
    basis = tmp_path / "nothing-here"
    if case == "basis of another model":
        basis = random_basis(tiny_model("qwen3"), 4).save_pretrained(tmp_path / "qwen3-basis")
    args = ["bench", "--model", str(tmp_path / "llama"), "--basis", str(basis), "--context", "8", "--caches", "headq"]
    done = subprocess.run([sys.executable, "-m", "transformers_headq.cli", *args], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr and "Traceback" not in done.stderr  # (after the model's loading bar, if any)
    message = " ".join(done.stderr.split("error:", 1)[1].split())
    expect = "neither a local basis folder" if case == "missing basis" else "calibrate one with `headq calibrate`"
    assert expect in message


def test_a_sub_basis_loads_from_beside_the_basis_and_a_missing_or_broken_one_is_said(saved_basis, capsys):
    """``subfolder`` (``key-pca``, ``oblique``) loads the sub-basis ``headq calibrate`` writes beside the basis; one
    that is not there is :class:`BasisNotAvailableError` (the eval skips its rows quietly), and a corrupt one is
    named on the console instead of passing for absent."""
    from transformers_headq.cli import _beside
    from transformers_headq.hub import BasisNotAvailableError

    model, path = saved_basis
    control = random_basis(model, 4)
    control.save_pretrained(path / "key-pca")
    loaded = QueryBasis.from_pretrained(path, subfolder="key-pca")
    assert torch.equal(loaded.layers[0].U, control.layers[0].U)
    with pytest.raises(BasisNotAvailableError, match="has no sub-basis 'oblique'"):
        QueryBasis.from_pretrained(path, subfolder="oblique")
    assert _beside(str(path), "oblique") is None and capsys.readouterr().out == ""
    weights = path / "key-pca" / "basis.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert _beside(str(path), "key-pca") is None
    assert "the key-pca basis beside" in " ".join(capsys.readouterr().out.split())
