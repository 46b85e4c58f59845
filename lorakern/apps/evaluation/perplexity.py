"""Perplexity over fixed, non-overlapping windows of a text."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ...data.wikitext import token_windows  # noqa: F401  (re-exported)

__all__ = ["token_windows", "perplexity"]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True, desc: str = "ppl") -> float:
    """exp(mean next-token NLL) over every predicted token of every window."""
    nll, count = 0.0, 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[i:i + batch_size]
        logits = model(ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
