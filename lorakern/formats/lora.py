"""LoRA adapter records: the dense layer and adapter (PEFT's math) and the LoRAQuant-compressed layer.

These are data definitions only; loading and saving live in :mod:`lorakern.adapters`, compression
in :mod:`lorakern.quant.loraquant`, application in :mod:`lorakern.ops` and :mod:`lorakern.nn`.
A compressed layer crosses into the kernels as 12 tensors (:meth:`CompressedLoRA.op_tensors`:
codes, scales, zeros of the parts named in :data:`LORA_PARTS`) and into the C++ core as four
:class:`LoraPartView` records (``lk_qweight`` in C).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .packing import SUPPORTED_GROUP_SIZES
from .quantized import QuantizedWeight

__all__ = ["CompressedLoRA", "LORA_PARTS", "LoraAdapter", "LoraLayer", "LoraPartView", "LoraParts",
           "lora_group_size"]


class LoraParts(NamedTuple):
    """The four parts of a compressed adapter (``lk_lora`` in C), each ``(codes, scales, zeros)``: the
    high rows of A' and of B'^T at ``bits_hi``, then their 1-bit rows."""
    a_hi: tuple
    b_hi: tuple
    a_lo: tuple
    b_lo: tuple

    @classmethod
    def of(cls, tensors) -> "LoraParts":
        """The parts of the 12-tensor list the ops take (:meth:`CompressedLoRA.op_tensors`)."""
        return cls(*(tuple(tensors[3 * i: 3 * i + 3]) for i in range(4)))

    def flat(self) -> list:
        """Back to the 12-tensor list."""
        return [t for part in self for t in part]


#: the four parts of a compressed adapter, in the order of :meth:`CompressedLoRA.op_tensors`
LORA_PARTS = LoraParts._fields


class LoraPartView(NamedTuple):
    """One part of a compressed adapter as the C++ core reads it (``lk_qweight`` in C), field for field."""
    qweight: int     #: address of the packed codes
    scales: int      #: address of the fp16 scales
    zeros: int       #: address of the fp16 zeros
    N: int           #: rows of the part
    K: int           #: columns (the layer's in_features for A, out_features for B^T)
    bits: int
    group_size: int


def lora_group_size(n: int, want: int = 128) -> int:
    """Largest supported group size <= want dividing n (128, 64 or 32)."""
    g = next((g for g in sorted(SUPPORTED_GROUP_SIZES, reverse=True) if g <= want and n % g == 0), None)
    if g is None:
        raise ValueError(f"dimension {n} is not a multiple of any group size in {SUPPORTED_GROUP_SIZES}")
    return g


@dataclass(frozen=True)
class CompressedLoRA:
    """A LoRAQuant-compressed adapter, ``delta ~ scale * B' A'``.

    Attributes:
        a_hi, a_lo: A' rows ``[:h]`` and ``[h:]`` as quantized ``[h, k]`` / ``[r-h, k]``
            weights (groups along k); None when empty.
        b_hi, b_lo: B' columns ``[:h]`` and ``[h:]``, stored transposed ``[h, d]`` /
            ``[r-h, d]`` (groups along d, i.e. down B's columns); None when empty.
        shape: ``(d, k)`` of the delta (out_features, in_features).
        rank, h: r and the number of high-precision components.
        scale: the adapter's scaling (PEFT's lora_alpha / r), applied to the product.
    """

    a_hi: QuantizedWeight | None
    b_hi: QuantizedWeight | None
    a_lo: QuantizedWeight | None
    b_lo: QuantizedWeight | None
    shape: tuple[int, int]
    rank: int
    h: int
    scale: float = 1.0

    def __post_init__(self):
        d, k = self.shape
        if not 0 <= self.h <= self.rank:
            raise ValueError(f"h={self.h} must lie in [0, rank={self.rank}]")
        for name, w, rows, cols in (("a_hi", self.a_hi, self.h, k), ("b_hi", self.b_hi, self.h, d),
                                    ("a_lo", self.a_lo, self.rank - self.h, k),
                                    ("b_lo", self.b_lo, self.rank - self.h, d)):
            if rows == 0:
                if w is not None:
                    raise ValueError(f"{name} must be None when it has no components")
            elif w is None or w.shape != (rows, cols):
                raise ValueError(f"{name} must have shape {(rows, cols)}, got {None if w is None else w.shape}")
        for name, w in (("a_lo", self.a_lo), ("b_lo", self.b_lo)):
            if w is not None and w.bits != 1:
                raise ValueError(f"{name} must be 1-bit sign weights, got {w.bits} bits")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``(B' [d, r], A' [r, k])`` in fp32 (the reference)."""
        d, k = self.shape
        parts_b = [w.dequantize() for w in (self.b_hi, self.b_lo) if w is not None]
        parts_a = [w.dequantize() for w in (self.a_hi, self.a_lo) if w is not None]
        Bt = torch.cat(parts_b, 0) if parts_b else torch.zeros(0, d)
        A = torch.cat(parts_a, 0) if parts_a else torch.zeros(0, k)
        return Bt.t().contiguous(), A

    def delta(self) -> torch.Tensor:
        """The dense ``[d, k]`` update ``scale * B' A'`` (fp32)."""
        B, A = self.factors()
        return self.scale * (B @ A)

    @property
    def bits_high(self) -> int:
        """Bits of the high part (2 when it is empty)."""
        return self.a_hi.bits if self.a_hi is not None else 2

    @property
    def group_sizes(self) -> tuple[int, int]:
        """``(group of A along k, group of B'^T along d)``."""
        a = self.a_hi if self.a_hi is not None else self.a_lo
        b = self.b_hi if self.b_hi is not None else self.b_lo
        return (a.group_size, b.group_size) if a is not None else (lora_group_size(self.shape[1]),
                                                                   lora_group_size(self.shape[0]))

    def op_tensors(self, device=None) -> list[torch.Tensor]:
        """The 12 tensors the ops take (``torch.ops.lorakern.lora_mixed``): packed codes, scales and zeros of
        a_hi, b_hi, a_lo, b_lo; an empty part becomes 0-row tensors of the right widths."""
        d, k = self.shape
        ga, gb = self.group_sizes
        out = []
        for w, bits, cols, G in ((self.a_hi, self.bits_high, k, ga), (self.b_hi, self.bits_high, d, gb),
                                 (self.a_lo, 1, k, ga), (self.b_lo, 1, d, gb)):
            if w is None:
                out += [torch.empty(0, cols * bits // 8, dtype=torch.uint8),
                        torch.empty(0, cols // G, dtype=torch.float16), torch.empty(0, cols // G, dtype=torch.float16)]
            else:
                out += [w.qweight, w.scales, w.zeros]
        return [t.to(device) for t in out] if device is not None else out

    def parts(self, device=None) -> LoraParts:
        """:meth:`op_tensors` by name."""
        return LoraParts.of(self.op_tensors(device))

    def bits_per_param(self) -> float:
        """Stored bits (codes, scales, zeros of all four parts) per adapter parameter r(d + k)."""
        d, k = self.shape
        nbytes = sum(w.nbytes() for w in (self.a_hi, self.b_hi, self.a_lo, self.b_lo) if w is not None)
        return 8.0 * nbytes / (self.rank * (d + k))



@dataclass
class LoraLayer:
    """One adapted Linear: ``delta = scale * B @ A`` (A ``[r, in]``, B ``[out, r]``)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B.float() @ self.A.float())


@dataclass
class LoraAdapter:
    """A LoRA adapter: its PEFT config and its layers by module name (e.g. ``model.layers.0.self_attn.q_proj``)."""

    config: dict
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    #: copies of base weights PEFT saved beside the adapter (``lm_head``, ``embed_tokens``), by module name;
    #: they must equal the model's weights (:func:`check_base_weights`)
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    #: lorakern's own string metadata (task name, description), kept out of PEFT's config
    metadata: dict[str, str] = field(default_factory=dict)


