"""The ways users call generate: pipelines, and one basis serving many requests without leaks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from transformers_headq import HeadQCache, HeadQCacheFactory

from .helpers import random_basis, save_tiny_model_folder

TEXT = " ".join(f"w{(i * 7) % 90}" for i in range(400))
PROMPTS = ["w1 w8 w15 w22 w29 w36 w43 w50 w57", "w3 w3 w9", "w70 w71 w72 w73 w74 w75 w76 w77 w78 w79 w80 w81"]
SETTINGS = {"rank": 4, "key_bits": 2, "value_bits": 2, "block_size": 4, "side_bits": 3, "value_keep": 1}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    save_tiny_model_folder(folder, TEXT)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    basis_folder = random_basis(model, rank=4).save_pretrained(folder / "basis")
    return model, tokenizer, basis_folder


def _generate(model, tokenizer, prompt: str, cache) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=10, do_sample=False)
    return out[0].tolist()


def test_one_factory_serves_many_requests_without_leaking_state(served):
    model, tokenizer, basis_folder = served
    make_cache = HeadQCacheFactory.from_pretrained(basis_folder, model=model, **SETTINGS)
    before = [layer.U.clone() for layer in make_cache.basis.layers]
    served_outputs = [_generate(model, tokenizer, p, make_cache()) for p in PROMPTS + PROMPTS[::-1]]
    # each request alone, through a cache loaded from scratch, gives the same tokens
    alone = [
        _generate(model, tokenizer, prompt, HeadQCache.from_pretrained(basis_folder, model, **SETTINGS))
        for prompt in PROMPTS
    ]
    assert served_outputs[:3] == alone and served_outputs[3:] == alone[::-1]
    assert all(torch.equal(a, layer.U) for a, layer in zip(before, make_cache.basis.layers, strict=True))


def test_a_used_cache_is_refused_for_another_request(served):
    model, tokenizer, basis_folder = served
    cache = HeadQCacheFactory.from_pretrained(basis_folder, model=model, **SETTINGS)()
    _generate(model, tokenizer, PROMPTS[1], cache)  # 13 tokens cached for one sequence
    longer = " ".join(f"w{i}" for i in range(20))
    inputs = tokenizer([longer, longer], return_tensors="pt")
    with pytest.raises(ValueError, match="fresh cache per request"):
        model.generate(**inputs, past_key_values=cache, max_new_tokens=3, do_sample=False)


def test_text_generation_pipeline_passes_the_cache_through(served):
    model, tokenizer, basis_folder = served
    make_cache = HeadQCacheFactory.from_pretrained(basis_folder, model=model, **SETTINGS)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    for prompt in PROMPTS:
        cache = make_cache()
        result = generator(prompt, max_new_tokens=10, do_sample=False, past_key_values=cache, return_tensors=True)
        assert result[0]["generated_token_ids"] == _generate(model, tokenizer, prompt, make_cache())
        assert cache.get_seq_length() > 0  # the pipeline really generated through our cache
