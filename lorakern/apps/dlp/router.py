"""DLP-LoRA's plugin (Zhang et al., 2024, arXiv 2410.01497): a small classifier reads the prompt, gives a
distribution over task adapters, keeps the top-p of them and fuses those with their renormalized
probabilities for the whole sequence, ``y = base(x) + sum_i w_i * s_i * B_i A_i x``.

The fusion runs through lorakern's multi-adapter kernels as a per-sample mixture (every sample of a batch
its own set of adapters and weights, one kernel call per layer), so a batch whose prompts belong to
different tasks is one batch.

Departures from the paper's code, and why:

* The prompt representation is the base model's own input embeddings, mean-pooled over the prompt's
  tokens (no second encoder model to load: the paper uses a separate small sentence encoder). It costs
  one embedding lookup per request.
* The classifier is LayerNorm -> Linear -> GELU -> Linear (``hidden`` = 256 by default: ~150k parameters
  for a 576-wide model; the paper's plugin is a few million).
* Top-p as in the reference code (p = 0.6 by default): sort the probabilities, keep the smallest prefix
  whose sum reaches p, at least one adapter; ties keep the lower index first.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from ...formats.io import FormatError, read_safetensors

__all__ = ["DEFAULT_TOP_P", "DLPRouter", "FixedMixture", "prompt_features", "top_p_select"]

DEFAULT_TOP_P = 0.6  # the reference code's threshold
FORMAT = "lorakern.dlp_router"


def top_p_select(probs: torch.Tensor, top_p: float = DEFAULT_TOP_P) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p selection per row.

    Args:
        probs: ``[B, E]`` probabilities (non-negative, rows summing to 1; any float dtype).
        top_p: in ``[0, 1]``: keep the smallest prefix of the sorted probabilities whose sum is ``>= top_p``;
            at least one is always kept (``top_p <= 0``: the arg-max only; ``top_p >= 1``: every adapter with
            non-zero probability, and at least one). Ties are broken by the lower index.

    Returns:
        ``(ids int64 [B, k], weights float32 [B, k])`` with ``k`` the largest count kept in any row; a row
        that keeps fewer is padded with id -1 and weight 0. Weights are the kept probabilities renormalized
        to sum to 1.

    Raises:
        ValueError: ``probs`` not 2-D, empty, negative or non-finite, or ``top_p`` outside ``[0, 1]``.
    """
    if probs.dim() != 2 or probs.shape[1] == 0:
        raise ValueError(f"probs must be [B, E >= 1], got {tuple(probs.shape)}")
    if not (0.0 <= top_p <= 1.0) or math.isnan(top_p):
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    p = probs.detach().double().cpu()
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative")
    B, E = p.shape
    order = torch.sort(p, dim=1, descending=True, stable=True)
    sorted_p, idx = order.values, order.indices
    before = torch.cumsum(sorted_p, 1) - sorted_p  # mass of the higher-ranked ones
    keep = before < top_p - 1e-12 if top_p < 1.0 else sorted_p > 0
    keep[:, 0] = True
    k = int(keep.sum(1).max())
    ids = torch.where(keep, idx, torch.full_like(idx, -1))[:, :k].contiguous()
    w = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))[:, :k]
    total = w.sum(1, keepdim=True)
    uniform = (ids >= 0).double() / (ids >= 0).sum(1, keepdim=True)  # a row of all-zero probabilities
    return ids, torch.where(total > 0, w / total.clamp_min(1e-300), uniform).float().contiguous()


@torch.no_grad()
def prompt_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """The router's input: the model's input embeddings mean-pooled over each prompt's real tokens.

    Args:
        model: a transformers model (``get_input_embeddings()``).
        input_ids: int64 ``[B, S]``; attention_mask: ``[B, S]`` (1 = token, 0 = padding) or None.

    Returns:
        float32 ``[B, hidden]``.

    Raises:
        ValueError: wrong shapes, or a prompt with no token.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    m = mask.to(torch.float32).unsqueeze(-1)
    if (m.sum(1) == 0).any():
        raise ValueError("a prompt has no token (its attention_mask is all zeros)")
    emb = model.get_input_embeddings()(input_ids).float()
    return ((emb * m.to(emb.device)).sum(1) / m.sum(1).to(emb.device)).cpu()


class DLPRouter(nn.Module):
    """The DLP-LoRA plugin: a classifier from prompt features to a distribution over named adapters.

    Args:
        names: the adapters it chooses among (their names in the model's adapter bank).
        in_dim: feature size (the base model's hidden size, see :func:`prompt_features`).
        hidden: width of the hidden layer.
        top_p: selection threshold (:func:`top_p_select`), default 0.6 as the reference code.

    Use: :func:`lorakern.apps.dlp.train_router` trains one; :func:`lorakern.apps.dlp.attach_router` puts it on a model
    with an adapter bank, after which ``model.generate(..., adapter_names="auto")`` routes every request
    once, from its prompt, and decodes with that mixture.
    """

    def __init__(self, names: list[str], in_dim: int, hidden: int = 256, top_p: float = DEFAULT_TOP_P):
        super().__init__()
        names = list(names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"names must be distinct non-empty strings, got {names!r}")
        if "__base__" in names:
            raise ValueError("'__base__' is not an adapter name")
        if in_dim < 1 or hidden < 1:
            raise ValueError(f"in_dim and hidden must be positive, got {in_dim}, {hidden}")
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        self.names, self.in_dim, self.hidden, self.top_p = names, int(in_dim), int(hidden), float(top_p)
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, len(names)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, E]`` for features ``[B, in_dim]``."""
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"features must be [B, {self.in_dim}], got {tuple(features.shape)}")
        return self.net(features.float())

    @torch.no_grad()
    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``[B, E]`` (float32)."""
        was = self.training
        self.eval()
        try:
            return torch.softmax(self(features), dim=-1)
        finally:
            self.train(was)

    def select(self, features: torch.Tensor, top_p: float | None = None):
        """``(ids [B, k], weights [B, k])`` over :attr:`names` (see :func:`top_p_select`)."""
        return top_p_select(self.probs(features), self.top_p if top_p is None else top_p)

    def route(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Per prompt: ``(names [B][k], weights [B, k])``, the kept adapters (padded with ``None``/0)."""
        ids, w = self.select(prompt_features(model, input_ids, attention_mask))
        return [[self.names[i] if i >= 0 else None for i in row] for row in ids.tolist()], w

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def config(self) -> dict:
        return {"names": self.names, "in_dim": self.in_dim, "hidden": self.hidden, "top_p": self.top_p}

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: the weights, and the config in the metadata."""
        from safetensors.torch import save_file
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": FORMAT, "config": json.dumps(self.config())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DLPRouter":
        """Read a router file; every key, shape and value is checked (never unpickles).

        Raises:
            FormatError: not a router file, truncated, a config that does not match the tensors, NaN/Inf.
        """
        tensors, meta = read_safetensors(path)
        if meta.get("format") != FORMAT:
            raise FormatError(f"{path}: not a lorakern DLP router file (format {meta.get('format')!r})")
        try:
            cfg = json.loads(meta["config"])
            router = cls(cfg["names"], int(cfg["in_dim"]), int(cfg["hidden"]), float(cfg["top_p"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: bad router config ({e})") from None
        want = router.state_dict()
        if set(tensors) != set(want):
            raise FormatError(f"{path}: tensors {sorted(set(tensors) ^ set(want))[:4]} missing or unexpected")
        for k, t in tensors.items():
            if t.shape != want[k].shape or not t.dtype.is_floating_point:
                raise FormatError(f"{path}: {k} is {t.dtype} {tuple(t.shape)}, expected float {tuple(want[k].shape)}")
            if not torch.isfinite(t).all():
                raise FormatError(f"{path}: {k} has NaN or Inf")
        router.load_state_dict({k: t.float() for k, t in tensors.items()})
        return router.eval()


class FixedMixture:
    """A "router" that gives every prompt the same mixture (e.g. the uniform merge of all adapters), for
    baselines: usable wherever a :class:`DLPRouter` is (``attach_router``)."""

    def __init__(self, names: list[str], weights: list[float] | None = None):
        self.names = list(names)
        w = torch.tensor(weights if weights is not None else [1.0 / len(self.names)] * len(self.names),
                         dtype=torch.float32)
        if w.shape != (len(self.names),) or (w < 0).any() or not torch.isfinite(w).all():
            raise ValueError(f"weights must be {len(self.names)} non-negative numbers")
        self.weights = w

    def route(self, model, input_ids, attention_mask=None):
        B = input_ids.shape[0]
        return [list(self.names) for _ in range(B)], self.weights.expand(B, -1).clone()
