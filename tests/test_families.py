"""Every supported decoder family: decode-exact quantized caches, calibration, and score error.

Tiny random configs (see ``helpers.FAMILIES``) that keep what makes each family different: GQA
and MQA, q/k norms, attention biases, partial rotary, learned positions, logit soft-capping, head
dim 256, and sliding-window layers alone or mixed with global ones.
"""

from __future__ import annotations

import pytest
import torch

from transformers_headq import HeadQCache, HeadQConfig, enable_headq_attention
from transformers_headq.calibrate import calibrate, observe_attention
from transformers_headq.corpus import batches
from transformers_headq.errors import UnsupportedModelError
from transformers_headq.fingerprint import check_supported, model_fingerprint, sliding_windows
from transformers_headq.layer import HeadQLayer

from .helpers import FAMILIES, random_basis, tiny_config, tiny_model

QUANTIZED = HeadQConfig(
    key_bits=2,
    value_bits=2,
    block_size=4,
    side_bits=3,
    side_scale="block",
    value_keep=1,
    sink_keys=2,
    meta_dtype="float32",
)


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _log_likelihoods(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_forward_equals_token_by_token_decode(family):
    """Quantized keys and values, side code, A² kept values, exact sink keys, and sliding-window eviction."""
    model = tiny_model(family)
    enable_headq_attention(model)
    basis = random_basis(model, rank=4)
    ids = _ids(2, 29, seed=0)
    one_cache = HeadQCache(basis, QUANTIZED, model_config=model.config)
    one_forward = model(input_ids=ids, past_key_values=one_cache).logits
    step_cache = HeadQCache(basis, QUANTIZED, model_config=model.config)
    steps = [model(input_ids=ids[:, t : t + 1], past_key_values=step_cache).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(
        _log_likelihoods(one_forward, ids), _log_likelihoods(torch.cat(steps, 1), ids), atol=1e-5, rtol=0
    )
    for layer, window in zip(step_cache.layers, sliding_windows(model.config), strict=True):
        assert isinstance(layer, HeadQLayer) and layer.get_seq_length() == 29
        if window is not None:  # only the window (rounded to whole blocks) is still held
            assert layer.stored_length <= window + QUANTIZED.block_size and layer.evicted > 0


def _captured(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with observe_attention(model, lambda layer, q, k: captured.setdefault(layer, (q, k))), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return captured


def _score_error(config: HeadQConfig, basis, captured) -> float:
    """Mean squared error of q·k over every layer when keys go through a HeadQ layer with ``config``."""
    total = 0.0
    for index, (q, k) in captured.items():
        layer = HeadQLayer(config, basis.layers[index] if config.rank else None, index)
        layer.update(k, k)
        groups = q.shape[1] // k.shape[1]
        qg = q.reshape(q.shape[0], k.shape[1], groups * q.shape[2], q.shape[3])
        total += (qg @ (layer.effective_keys() - k).transpose(-1, -2)).square().mean().item()
    return total / len(captured)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_calibrated_side_code_lowers_score_error(family):
    """Calibration captures each family's queries; its basis beats plain 2-bit keys on new inputs."""
    model = tiny_model(family)
    fp = model_fingerprint(model.config)
    basis = calibrate(model, batches(_ids(8, 32, seed=1), 4))["query"]
    assert basis.num_layers == fp["num_hidden_layers"] and basis.layers[0].U.shape[:2] == (
        fp["num_key_value_heads"],
        fp["head_dim"],
    )
    captured = _captured(model, _ids(4, 32, seed=2))
    plain = HeadQConfig(key_bits=2, block_size=8, rank=0)
    rank = fp["head_dim"] // 4
    headq = plain.replace(rank=rank, side_bits=4)
    plain_error = _score_error(plain, basis, captured)
    headq_error = _score_error(headq, basis.with_rank(rank), captured)
    assert headq_error < plain_error, (headq_error, plain_error)


def test_unsupported_and_chunked_models_are_named():
    config = tiny_config("llama")
    config.model_type = "mamba"
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported"):
        check_supported(config)
    chunked = tiny_config("llama")
    chunked.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="chunked attention"):
        sliding_windows(chunked)


def test_sliding_layers_refuse_to_roll_back_past_their_window():
    model = tiny_model("mistral-sliding")
    enable_headq_attention(model)
    cache = HeadQCache(config=QUANTIZED.replace(rank=0), model_config=model.config)
    for t in range(20):
        model(input_ids=_ids(1, 1, seed=t), past_key_values=cache)
    cache.crop(-2)  # within the window: fine
    assert cache.get_seq_length() == 18
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(2)
