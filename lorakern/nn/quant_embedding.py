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
        scale: a constant the looked-up rows are multiplied by (Gemma's ``embed_scale`` = sqrt(hidden_size),
            applied in ``dtype`` as transformers' ``Gemma3TextScaledWordEmbedding`` does); 1.0 for a plain lookup.
            :meth:`scale_of` reads it off an existing embedding.

    forward: int64 ids of any shape ``[...]`` -> ``[..., embedding_dim]`` in ``dtype``.

    Raises:
        IndexError: an id outside ``[0, num_embeddings)`` (checked before any kernel).
    """

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype = torch.float32, padding_idx: int | None = None,
                 tied_to: str | None = None, scale: float = 1.0):
        super().__init__()
        weight.validate()
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features
        self.bits, self.group_size = weight.bits, weight.group_size
        self.dtype, self.padding_idx, self.tied_to = dtype, padding_idx, tied_to
        self.scale = float(scale)
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)

    @staticmethod
    def scale_of(embedding: torch.nn.Embedding) -> float:
        """The constant ``c`` with ``embedding(ids) == c * weight[ids]`` (1.0 for ``nn.Embedding``; Gemma's
        scaled embedding gives sqrt(hidden_size)), checked on a probe of ids so that a subclass that does
        anything else is never replaced by a plain lookup.

        Raises:
            ValueError: the module's output is not a constant multiple of its table's rows.
        """
        if type(embedding) is torch.nn.Embedding:
            return 1.0
        w = embedding.weight
        c = getattr(embedding, "embed_scale", 1.0)
        c = float(c) if not isinstance(c, torch.Tensor) or c.numel() == 1 else None
        n = embedding.num_embeddings
        probe = torch.tensor(sorted({0, 1, n // 3, n // 2, n - 1} & set(range(n))), device=w.device)
        with torch.no_grad():
            out = embedding(probe)
            ok = c is not None and out.shape == (probe.numel(), w.shape[1]) and \
                torch.equal(out, w[probe] * torch.tensor(c, dtype=w.dtype, device=w.device))
        if not ok:
            raise ValueError(f"{type(embedding).__name__} is not a constant multiple of a table lookup: lorakern "
                             "cannot replace it by a QuantEmbedding")
        return c
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
        rows = rows.to(self.dtype)
        if self.scale != 1.0:
            rows = rows * torch.tensor(self.scale, dtype=self.dtype)  # in dtype, as Gemma's embed_scale
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        tied = f", tied_to={self.tied_to}" if self.tied_to else ""
        scale = f", scale={self.scale:g}" if self.scale != 1.0 else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"dtype={self.dtype}{scale}{tied}")
