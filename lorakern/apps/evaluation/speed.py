"""Decode speed through transformers' ``generate`` (what a user runs): tokens per second after the prompt,
time to first token, and prefill throughput."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

__all__ = ["DecodeSpeed", "decode_speed", "decode_tokens_per_second"]


@dataclass
class DecodeSpeed:
    """Medians over repeats. ``tokens_per_s``: decode steps after the first token, over all sequences of the
    batch; ``ttft_ms``: the prompt's forward and the first token; ``prefill_tokens_per_s``: prompt tokens
    (over the batch) per second of that forward."""
    tokens_per_s: float
    ttft_ms: float
    prefill_tokens_per_s: float
    batch: int
    prompt_tokens: int
    new_tokens: int


@torch.no_grad()
def decode_speed(model, input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3, **generate_kwargs) -> DecodeSpeed:
    """Time ``model.generate(input_ids, ...)`` greedily: once for one new token (time to first token), once for
    ``new_tokens``; the decode rate is the difference. The count is forced by ignoring the end-of-sequence token
    (``eos_token_id=None``, as ``llama-bench`` does), not by ``min_new_tokens``, whose logits processor masks the
    EOS logits over the whole vocabulary each step (~0.5 ms a token on SmolLM2's 49,152 here: not decode work). A
    warm-up call first (it compiles the decode step of a model set up by :func:`lorakern.prepare_decode`).

    Args:
        input_ids: int64 ``[B, S]`` prompts (B sequences of S tokens).
        new_tokens: decode steps to time (>= 2).
        generate_kwargs: passed on (``adapter_names=...`` for a model with an adapter bank).

    Raises:
        ValueError: ``new_tokens < 2`` or ids that are not ``[B, S]``.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2, got {new_tokens}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
    kw = dict(do_sample=False, pad_token_id=getattr(model.generation_config, "pad_token_id", None) or 0,
              eos_token_id=None)
    kw.update(generate_kwargs)

    def run(n):
        t0 = time.perf_counter()
        model.generate(input_ids, max_new_tokens=n, **kw)
        return time.perf_counter() - t0
    run(new_tokens)  # warm-up (and compilation)
    firsts, rates = [], []
    for _ in range(repeats):
        t1, tn = run(1), run(new_tokens)
        firsts.append(t1)
        rates.append(input_ids.shape[0] * (new_tokens - 1) / max(tn - t1, 1e-9))
    ttft = statistics.median(firsts)
    B, S = input_ids.shape
    return DecodeSpeed(statistics.median(rates), 1e3 * ttft, B * S / ttft, B, S, new_tokens)


def decode_tokens_per_second(model, tokenizer, prompt: str = "The history of the city", new_tokens: int = 32,
                             repeats: int = 3) -> float:
    """Median greedy decode tokens/s of one prompt through ``generate`` (prefill excluded): :func:`decode_speed`."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    return decode_speed(model, ids, new_tokens, repeats).tokens_per_s
