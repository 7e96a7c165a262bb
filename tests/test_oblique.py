"""The score-optimal (oblique) side code: what it minimises, that it reduces to the query eigenbasis when the
key error is isotropic, that truncating it stays optimal, and that calibration writes it as a basis."""

from __future__ import annotations

import pytest
import torch

from transformers_headq.basis import OBLIQUE, QueryBasis, basis_from_second_moment, oblique_code
from transformers_headq.calibrate import calibrate
from transformers_headq.corpus import batches
from transformers_headq.errors import BasisFormatError
from transformers_headq.quantize import GroupQuantizer

from .helpers import tiny_model


def _moment(heads: int, dim: int, seed: int, spread: float) -> torch.Tensor:
    """A random PSD ``[H, D, D]`` second moment whose eigenvalues span ``spread`` decades."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(heads, dim, dim, generator=gen, dtype=torch.float64))
    scales = torch.logspace(0, -spread, dim, dtype=torch.float64)
    return q @ torch.diag_embed(scales) @ q.transpose(-1, -2)


def _score_error(query: torch.Tensor, error: torch.Tensor, encoder: torch.Tensor, decoder: torch.Tensor) -> float:
    """``E (q·(e − W Aᵀ e))² = tr(Σ_q (I − W Aᵀ) Σ_e (I − W Aᵀ)ᵀ)``, summed over heads."""
    eye = torch.eye(query.shape[-1], dtype=torch.float64)
    rest = eye - decoder.double() @ encoder.double().transpose(-1, -2)
    return float(torch.einsum("hij,hjk,hlk,hil->", query, rest, error, rest))


@pytest.mark.core
@pytest.mark.parametrize("rank", [1, 4, 7])
def test_it_minimises_the_score_error_and_beats_the_query_eigenbasis(rank):
    query, error = _moment(3, 12, 0, 3.0), _moment(3, 12, 1, 2.0)  # anisotropic key error
    encoder, decoder, singular = oblique_code(query, error, rank)
    got = _score_error(query, error, encoder, decoder)
    # the reduced-rank optimum: the trailing squared singular values of Σ_q^½ Σ_e^½
    assert got == pytest.approx(float((singular.double()[:, rank:] ** 2).sum()), rel=1e-4)
    U, _ = basis_from_second_moment(query, rank)
    assert got < _score_error(query, error, U, U)
    for seed in range(3):  # and no other code of that rank does better (random perturbations of it)
        gen = torch.Generator().manual_seed(seed)
        nudged = encoder + 1e-2 * torch.randn(encoder.shape, generator=gen)
        assert got <= _score_error(query, error, nudged, decoder) * (1 + 1e-6)


@pytest.mark.core
def test_with_an_isotropic_error_it_is_the_query_eigenbasis():
    query = _moment(2, 10, 2, 2.0)
    encoder, decoder, _ = oblique_code(query, torch.eye(10, dtype=torch.float64).expand(2, 10, 10), 4)
    U, _ = basis_from_second_moment(query, 4)
    projection = decoder.double() @ encoder.double().transpose(-1, -2)
    torch.testing.assert_close(projection, U.double() @ U.double().transpose(-1, -2), atol=1e-5, rtol=0)


@pytest.mark.core
def test_its_leading_columns_are_the_lower_rank_code():
    query, error = _moment(2, 9, 3, 2.0), _moment(2, 9, 4, 1.0)
    full_encoder, full_decoder, _ = oblique_code(query, error, 9)
    encoder, decoder, _ = oblique_code(query, error, 3)
    torch.testing.assert_close(full_encoder[..., :3], encoder)
    torch.testing.assert_close(full_decoder[..., :3], decoder)


def test_calibration_writes_an_oblique_basis_that_round_trips(tmp_path):
    ids = torch.randint(1, 97, (4, 32), generator=torch.Generator().manual_seed(5))
    bases = calibrate(tiny_model(), batches(ids, 2), rank=6, key_quantizer=GroupQuantizer(2, "channel", 16))
    oblique = bases[OBLIQUE]
    assert oblique.kind == OBLIQUE and all(layer.decoder is not None for layer in oblique.layers)
    oblique.save_pretrained(tmp_path / "oblique")
    loaded = QueryBasis.from_pretrained(tmp_path / "oblique")
    for a, b in zip(loaded.with_rank(3).layers, oblique.layers, strict=True):
        torch.testing.assert_close(a.U, b.U[..., :3])
        torch.testing.assert_close(a.decoder, b.decoder[..., :3])
    assert "oblique" not in calibrate(tiny_model(), batches(ids, 2), rank=6)  # only for a key quantizer


def test_a_query_basis_with_a_skewed_U_is_still_refused():
    bases = calibrate(tiny_model(), batches(torch.randint(1, 97, (2, 16)), 2), rank=4)
    layers = bases["query"].layers
    layers[0].U = layers[0].U * 2
    with pytest.raises(BasisFormatError, match="orthonormal"):
        QueryBasis(layers, bases["query"].fingerprint)


def test_windows_shorter_than_a_block_give_no_oblique_basis():
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    bases = calibrate(tiny_model(), batches(ids, 2), rank=4, key_quantizer=GroupQuantizer(2, "channel", 16))
    assert "oblique" not in bases and "query" in bases
