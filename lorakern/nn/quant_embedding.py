"""QuantEmbedding: a token embedding read from a packed low-bit weight (the tied lm_head's, typically)."""
from __future__ import annotations

import torch

from ..formats.quantized import QuantizedWeight
from .storage import FormatBuffers

__all__ = ["QuantEmbedding"]


class QuantEmbedding(FormatBuffers):
    """``nn.Embedding`` over a group-wise quantized table ``W [num_embeddings, embedding_dim]``: a lookup
    gathers the tokens' packed rows and dequantizes only those (``torch.ops.lorakern.dequantize``), so no
    float copy of the table is kept.

    Made by :func:`lorakern.quantize_model` for models whose input embedding is tied to the output head
    (SmolLM2, Gemma): the embedding then reads the head's quantized rows (``tied_to`` names the head, and the
    buffers are the very same tensors, so the table is stored once).

    Args:
        weight: the packed table (:class:`~lorakern.formats.QuantizedWeight`, validated).
        dtype: the dtype of the looked-up vectors (the original embedding's; float32 by default).
        padding_idx: as ``nn.Embedding``'s (only recorded: the row is whatever the table holds).

    forward: int64 ids of any shape ``[...]`` -> ``[..., embedding_dim]`` in ``dtype``.

    Raises:
        IndexError: an id outside ``[0, num_embeddings)`` (checked before any kernel).
    """

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype = torch.float32, padding_idx: int | None = None,
                 tied_to: str | None = None):
        super().__init__()
        weight.validate()
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features
        self.bits, self.group_size = weight.bits, weight.group_size
        self.dtype, self.padding_idx, self.tied_to = dtype, padding_idx, tied_to
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)

    def _apply(self, fn, recurse=True):
        """``.half()`` / ``.to(dtype)`` change the looked-up vectors' dtype (the packed table keeps its own)."""
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table dequantized (``[num_embeddings, embedding_dim]`` in ``dtype``): for code that
        inspects ``embedding.weight``; costs a full dequantization."""
        return torch.ops.lorakern.dequantize(self.qweight, self.scales, self.zeros, self.bits,
                                             self.group_size).to(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"lorakern: QuantEmbedding takes integer token ids, got {ids.dtype}")
        flat = ids.reshape(-1)
        if not torch.compiler.is_compiling() and flat.numel():
            lo, hi = torch.aminmax(flat)
            if int(lo) < 0 or int(hi) >= self.num_embeddings:
                raise IndexError(f"lorakern: token id outside [0, {self.num_embeddings})")
        rows = torch.ops.lorakern.dequantize(self.qweight[flat], self.scales[flat], self.zeros[flat], self.bits,
                                             self.group_size)
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        tied = f", tied_to={self.tied_to}" if self.tied_to else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"dtype={self.dtype}{tied}")
