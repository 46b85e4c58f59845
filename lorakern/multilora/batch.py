"""LoRABatch: which adapter(s) each token of a batch uses, in the form the kernels take.

Built once per forward pass and shared by every layer: the (token, adapter, weight) entries,
sorted stably by adapter id, grouped into segments ``(id, first entry, count)``. A token without
adapter has no entry; a token with a k-way mixture (MoLA experts, DLP-LoRA fusion) has k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LoRABatch"]


@dataclass
class LoRABatch:
    """Attributes:
        num_tokens: T, the rows of x the batch describes.
        tokens: int64 ``[E]`` row of each entry, grouped by adapter.
        weights: fp32 ``[E]`` the entry's mixing weight (1 for a plain per-token adapter).
        segments: int64 ``[S, 3]``: adapter id, first entry, number of entries.
        max_count: the largest segment (the GPU kernels' grid), known on the host.
        ids: the distinct adapter ids used (host list).
        mixture: whether a token may have several entries (k-way mixtures; the GPU expand then adds
            atomically).
    """

    num_tokens: int
    tokens: torch.Tensor
    weights: torch.Tensor
    segments: torch.Tensor
    max_count: int
    ids: list
    mixture: bool = False

    def __post_init__(self):
        # the entry and segment counts change with every request: let torch.compile treat them as dynamic
        # sizes (one compiled graph for every batch composition, not one per count)
        if not torch.compiler.is_compiling():  # (a batch built inside a traced region keeps its sizes)
            for t in (self.tokens, self.weights, self.segments):
                torch._dynamo.maybe_mark_dynamic(t, 0)

    @property
    def num_entries(self) -> int:
        return self.tokens.shape[0]

    def op_args(self) -> tuple:
        """``(segments, tokens, weights)`` as the ops take them."""
        return self.segments, self.tokens, self.weights

    def to(self, device) -> "LoRABatch":
        return LoRABatch(self.num_tokens, self.tokens.to(device), self.weights.to(device), self.segments.to(device),
                         self.max_count, self.ids, self.mixture)

    @staticmethod
    def from_ids(ids, weights=None, num_slots: int | None = None, live=None, device="cpu") -> "LoRABatch":
        """From per-token ids: int ``[T]`` (-1: none), or ``[T, k]`` with fp ``weights [T, k]``.

        ``live`` (bool ``[num_slots]``), if given, must be True for every id used: a removed
        adapter still named by the batch raises here, before any kernel runs.
        """
        ids = torch.as_tensor(ids)
        if ids.dtype in (torch.bool,) or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise TypeError(f"lorakern: adapter ids must be integers, got {ids.dtype}")
        ids = ids.to("cpu", torch.int64)
        if ids.dim() not in (1, 2):
            raise ValueError(f"lorakern: adapter ids must be [T] or [T, k], got shape {tuple(ids.shape)}")
        single = ids.dim() == 1
        if single:
            if weights is not None:
                raise ValueError("lorakern: weights go with [T, k] ids (mixtures)")
            ids2, w2 = ids[:, None], torch.ones(ids.shape[0], 1)
        else:
            if weights is None:
                raise ValueError("lorakern: [T, k] ids (a mixture per token) need weights [T, k]")
            w2 = torch.as_tensor(weights)
            if not w2.dtype.is_floating_point:
                raise TypeError(f"lorakern: mixture weights must be floating point, got {w2.dtype}")
            w2 = w2.to("cpu", torch.float32)
            if w2.shape != ids.shape:
                raise ValueError(f"lorakern: weights {tuple(w2.shape)} must match ids {tuple(ids.shape)}")
            if not bool(torch.isfinite(w2).all()):
                raise ValueError("lorakern: mixture weights contain NaN or Inf")
            ids2 = ids
        T = ids2.shape[0]
        if bool((ids2 < -1).any()):
            raise ValueError(f"lorakern: adapter id {int(ids2.min())} is invalid (-1 means no adapter)")
        if num_slots is not None and bool((ids2 >= num_slots).any()):
            raise IndexError(f"lorakern: adapter id {int(ids2.max())} is out of range (the bank has {num_slots} ids)")
        use = ids2 >= 0
        flat_ids = ids2[use]
        if live is not None and flat_ids.numel():
            dead = ~live[flat_ids]
            if bool(dead.any()):
                raise ValueError(f"lorakern: adapter id {int(flat_ids[dead][0])} was removed from the bank")
        tok = torch.arange(T).unsqueeze(1).expand_as(ids2)[use]
        wt = w2[use]
        order = torch.argsort(flat_ids, stable=True)
        sid = flat_ids[order]
        uniq, counts = torch.unique_consecutive(sid, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        segments = torch.stack([uniq, starts, counts], 1).contiguous() if uniq.numel() else \
            torch.zeros(0, 3, dtype=torch.int64)
        return LoRABatch(T, tok[order].contiguous().to(device), wt[order].contiguous().to(device),
                         segments.to(device), int(counts.max()) if counts.numel() else 0, uniq.tolist(),
                         mixture=not single)

    @staticmethod
    def build(bank, adapters, weights=None, device="cpu") -> "LoRABatch":
        """From adapter names or ids of ``bank`` (None / '__base__' / -1: no adapter)."""
        def to_id(a):
            if a is None or a == "__base__":
                return -1
            if isinstance(a, str):
                return bank.id(a)
            return int(a)
        if isinstance(adapters, torch.Tensor):
            ids = adapters
        elif weights is None:
            ids = torch.tensor([to_id(a) for a in adapters], dtype=torch.int64)
        else:
            ids = torch.tensor([[to_id(a) for a in row] for row in adapters], dtype=torch.int64)
        return LoRABatch.from_ids(ids, weights, bank.num_slots, bank.live(), device)

    def repeat_tokens(self, n: int) -> "LoRABatch":
        """The batch for every sample's ``n`` tokens (a per-sample batch over ``[B, n]`` activations)."""
        if n == 1:
            return self
        seg = self.segments.clone()
        seg[:, 1] *= n
        seg[:, 2] *= n
        tok = (self.tokens.unsqueeze(1) * n + torch.arange(n, device=self.tokens.device)).reshape(-1)
        wt = self.weights.unsqueeze(1).expand(-1, n).reshape(-1).contiguous()
        return LoRABatch(self.num_tokens * n, tok.contiguous(), wt, seg, self.max_count * n, self.ids, self.mixture)
