"""Decode speed: greedy generation with a KV cache, tokens per second."""
from __future__ import annotations

import time

import torch

__all__ = ["decode_tokens_per_second"]


@torch.no_grad()
def decode_tokens_per_second(model, tokenizer, prompt: str = "The history of the city", new_tokens: int = 32,
                             repeats: int = 3) -> float:
    """Median tokens/s of ``new_tokens`` greedy decode steps (prefill excluded)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    rates = []
    for _ in range(repeats):
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        rates.append(new_tokens / (time.perf_counter() - t0))
    rates.sort()
    return rates[len(rates) // 2]
