"""One process of the parallel tests: greedy decode through a HeadQ cache, written as JSON.

Run alone (``python -m tests.parallel_worker MODEL BASIS OUT``) it decodes on one process; under
``torchrun`` with ``--tensor-parallel`` it loads the model split by its own tensor-parallel plan
(gloo on CPU). Rank 0 writes the greedy tokens, the first forward's logits and, per rank, which
KV heads its cache took and their decoder, so the test can compare them with the full basis.
With ``--calibrate`` it calibrates a basis on fixed ids and writes it to BASIS instead.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from transformers_headq import HeadQCache
from transformers_headq.calibrate import calibrate
from transformers_headq.corpus import batches
from transformers_headq.loading import load_model

CALIBRATION_IDS = torch.randint(1, 97, (4, 24), generator=torch.Generator().manual_seed(3))
PROMPT = torch.tensor([[5, 17, 3, 44, 9, 61, 2, 30, 12, 7, 88, 41, 19, 23, 6, 50, 71, 8, 14, 90]])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("basis")
    parser.add_argument("out")
    parser.add_argument("--tensor-parallel", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--calibrate", action="store_true", help="calibrate into BASIS instead of decoding")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.tensor_parallel and not dist.is_initialized():
        dist.init_process_group("gloo")
    model = load_model(args.model, tensor_parallel=args.tensor_parallel).model
    if args.calibrate:
        bases = calibrate(model, batches(CALIBRATION_IDS, 2), rank=8)
        if not dist.is_initialized() or dist.get_rank() == 0:
            bases["query"].save_pretrained(args.basis)
        _finish()
        return
    model.generation_config.pad_token_id = 0
    cache = HeadQCache.from_pretrained(args.basis, model=model)
    with torch.no_grad():
        logits = model(input_ids=PROMPT, past_key_values=cache, use_cache=True).logits[0, -1]
    cache = HeadQCache.from_pretrained(args.basis, model=model)
    tokens = model.generate(PROMPT, past_key_values=cache, max_new_tokens=args.new_tokens, do_sample=False)
    layer = cache.layers[0]
    mine = {
        "kv_heads": list(cache.basis.kv_heads or (0, layer.shape[1])) if cache.basis is not None else None,
        "decoder": layer.decoder.tolist() if layer.decoder is not None else None,
    }
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if not dist.is_initialized() or dist.get_rank() == 0:
        result = {"tokens": tokens[0].tolist(), "logits": logits.tolist(), "ranks": ranks}
        with open(args.out, "w") as f:
            json.dump(result, f)
    _finish()


def _finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
