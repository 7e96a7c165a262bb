"""Helpers shared by tests: tiny random models and bases for them."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from transformers_headq import QueryBasis
from transformers_headq.basis import LayerBasis
from transformers_headq.fingerprint import model_fingerprint

FAMILIES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
}


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, layers: int = 2, seed: int = 0):
    """A random model with GQA (4 query heads sharing 2 KV heads, head dim 16), in eval mode."""
    torch.manual_seed(seed)
    config = FAMILIES[family](
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        sliding_window=None,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 0
    return model


def basis_from_tensors(model, U_per_layer: list[torch.Tensor], kind: str = "query") -> QueryBasis:
    """A QueryBasis for ``model`` whose layers use the given ``[H, D, r]`` bases."""
    layers = []
    for U in U_per_layer:
        heads, dim, _ = U.shape
        layers.append(LayerBasis(U=U.float(), eigenvalues=torch.ones(heads, dim), query_mean=torch.zeros(heads, dim)))
    return QueryBasis(layers=layers, fingerprint=model_fingerprint(model.config), kind=kind)


def random_orthonormal(heads: int, dim: int, rank: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(heads, dim, dim, generator=gen, dtype=torch.float64))
    return q[..., :rank].float()


def random_basis(model, rank: int, seed: int = 0) -> QueryBasis:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return basis_from_tensors(
        model,
        [random_orthonormal(cfg.num_key_value_heads, head_dim, rank, seed + i) for i in range(cfg.num_hidden_layers)],
    )


def save_tiny_model_folder(path, text: str) -> None:
    """A tiny Llama and a word-level tokenizer over ``text``'s words, saved as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(text.split()))
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(words[:96])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    tiny_model().save_pretrained(path)
