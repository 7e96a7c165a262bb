"""Helpers shared by tests: tiny random models and bases for them."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from transformers_headq import QueryBasis
from transformers_headq.basis import LayerBasis
from transformers_headq.fingerprint import model_fingerprint

_GQA = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
_GEMMA = {
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "sliding_window": 8,
    "max_position_embeddings": 512,
    "query_pre_attn_scalar": 256,
}
# Tiny random configs, one per supported decoder family, each with what makes the family different.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", _GQA),
    "mistral": ("MistralConfig", {**_GQA, "sliding_window": None}),
    "mistral-sliding": ("MistralConfig", {**_GQA, "sliding_window": 8}),  # every layer slides
    "qwen2": ("Qwen2Config", {**_GQA, "sliding_window": None}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {**_GQA, "head_dim": 16, "sliding_window": None}),  # q/k RMS norms
    # alternating sliding/global layers, logit soft-capping, head dim 256, MQA
    "gemma2": ("Gemma2Config", _GEMMA),
    # five sliding layers per global one, q/k norms, MQA
    "gemma3": ("Gemma3TextConfig", _GEMMA),
    "phi3": ("Phi3Config", {**_GQA, "bos_token_id": 1, "eos_token_id": 2}),  # fused qkv projection
    "gpt_neox": ("GPTNeoXConfig", {"num_attention_heads": 4, "rotary_pct": 0.25, "max_position_embeddings": 512}),
    # learned positions, Conv1D attention
    "gpt2": ("GPT2Config", {"n_head": 4, "n_positions": 512, "bos_token_id": 1, "eos_token_id": 2}),
}
HYBRID_LAYERS = {"gemma2": 2, "gemma3": 6}  # enough layers to hold both kinds


def tiny_config(family: str = "llama", layers: int = 2):
    """A tiny config of ``family`` (vocab 97, hidden 64)."""
    import transformers

    name, extra = FAMILIES[family]
    sizes = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": layers}
    if family == "gpt2":
        sizes = {"vocab_size": 97, "n_embd": 64, "n_inner": 96, "n_layer": layers}
    return getattr(transformers, name)(**sizes, **extra, pad_token_id=0, tie_word_embeddings=False)


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, layers: int | None = None, seed: int = 0):
    """A random model of ``family`` in eval mode (GQA or MQA where the family has it)."""
    torch.manual_seed(seed)
    config = tiny_config(family, layers or HYBRID_LAYERS.get(family, 2))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.set_attn_implementation("eager" if family == "gemma2" else "sdpa")  # Gemma 2 has no sdpa path
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
    fp = model_fingerprint(model.config)
    heads, head_dim = fp["num_key_value_heads"], fp["head_dim"]
    return basis_from_tensors(
        model, [random_orthonormal(heads, head_dim, rank, seed + i) for i in range(fp["num_hidden_layers"])]
    )


def save_tiny_model_folder(path, text: str, family: str = "llama") -> None:
    """A tiny model of ``family`` and a word-level tokenizer over ``text``'s words, saved as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(text.split()))
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(words[:96])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    tiny_model(family).save_pretrained(path)


def prefill_then_decode(model, cache, ids: torch.Tensor, prefill: int, forward=None) -> torch.Tensor:
    """Logits of the last prefill token and of every decoded token, ``[B, 1 + T - prefill, V]``."""
    forward = forward or model
    with torch.no_grad():
        logits = [model(input_ids=ids[:, :prefill], past_key_values=cache).logits[:, -1:]]
        for t in range(prefill, ids.shape[1]):
            position = torch.full((ids.shape[0], 1), t)
            logits.append(forward(input_ids=ids[:, t : t + 1], past_key_values=cache, position_ids=position).logits)
    return torch.cat(logits, dim=1)
