"""Training the DLP-LoRA router on example prompts of each adapter's task."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .router import DEFAULT_TOP_P, DLPRouter, prompt_features

__all__ = ["attach_router", "prompt_batches", "train_router"]


def prompt_batches(tokenizer, prompts: list[str], batch_size: int = 64, add_special_tokens: bool = True):
    """Yield ``(input_ids, attention_mask)`` of left-padded batches of ``prompts``, encoded as
    ``tokenizer(prompt, add_special_tokens=...)`` (encode them as your requests will be)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(prompts), batch_size):
        enc = [tokenizer(p, add_special_tokens=add_special_tokens).input_ids for p in prompts[i:i + batch_size]]
        L = max(map(len, enc))
        ids = torch.tensor([[pad] * (L - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])
        yield ids, mask


@torch.no_grad()
def _features(model, tokenizer, prompts: list[str], add_special_tokens: bool) -> torch.Tensor:
    return torch.cat([prompt_features(model, ids, mask)
                      for ids, mask in prompt_batches(tokenizer, prompts, add_special_tokens=add_special_tokens)])


def train_router(model: nn.Module, tokenizer, prompts: dict[str, list[str]], *, hidden: int = 256,
                 top_p: float = DEFAULT_TOP_P, epochs: int = 60, lr: float = 3e-3, weight_decay: float = 1e-2,
                 batch_size: int = 64, seed: int = 0, add_special_tokens: bool = True,
                 progress: bool = True) -> DLPRouter:
    """Train a :class:`DLPRouter` to tell the adapters' tasks apart from their prompts.

    Args:
        model, tokenizer: the base model whose input embeddings are the features.
        prompts: ``{adapter name: [prompt, ...]}`` (at least one prompt each; the more varied the better).
        hidden, top_p: the router's (see :class:`DLPRouter`).
        epochs, lr, weight_decay, batch_size: AdamW on the cross-entropy of the adapter's index.
        seed: fixes the initialization and the shuffling (same seed, same router).
        add_special_tokens: how the prompts are encoded (as the requests the router will see are).

    Returns:
        the router in eval mode; ``router.record`` holds the final training loss and accuracy.

    Raises:
        ValueError: fewer than two adapters, or an adapter with no prompt.
    """
    names = list(prompts)
    if len(names) < 2:
        raise ValueError("a router needs at least two adapters to choose among")
    for n, ps in prompts.items():
        if not ps or not all(isinstance(p, str) and p for p in ps):
            raise ValueError(f"adapter {n!r}: needs a non-empty list of non-empty prompt strings")
    feats = [_features(model, tokenizer, list(prompts[n]), add_special_tokens) for n in tqdm(names, desc="router features",
                                                                          disable=not progress, leave=False)]
    x = torch.cat(feats)
    y = torch.cat([torch.full((f.shape[0],), i, dtype=torch.long) for i, f in enumerate(feats)])
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    router = DLPRouter(names, x.shape[1], hidden, top_p)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    router.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(epochs), desc="train router", disable=not progress, leave=False):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            b = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(router(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    router.eval()
    with torch.no_grad():
        acc = float((router(x).argmax(1) == y).float().mean())
    router.record = {"loss": float(loss.detach()), "train_accuracy": acc, "prompts": int(x.shape[0]), "epochs": epochs,
                     "seed": seed}
    return router


def attach_router(model: nn.Module, router) -> None:
    """Give a model with an adapter bank (:func:`lorakern.attach_adapters`) a router: afterwards
    ``model(..., adapter_names="auto")`` and ``model.generate(..., adapter_names="auto")`` route each
    prompt once and run the kept adapters as that sample's mixture (prefill and every decode step).

    Raises:
        ValueError: the model has no adapter bank, the router names adapters the bank lacks, or its
            feature size is not the model's embedding size.
    """
    bank = getattr(model, "lorakern_bank", None)
    if bank is None:
        raise ValueError("lorakern: attach_adapters first: the router picks among the bank's adapters")
    missing = [n for n in router.names if n not in bank.names]
    if missing:
        raise ValueError(f"lorakern: the router names adapters the bank lacks: {missing}")
    in_dim = getattr(router, "in_dim", None)
    emb = model.get_input_embeddings().weight.shape[1]
    if in_dim is not None and in_dim != emb:
        raise ValueError(f"lorakern: the router reads {in_dim}-wide features, the model's embeddings are {emb}")
    model.__dict__["lorakern_router"] = router  # not a submodule: its weights stay out of the model's state_dict
