"""The group-wise quantized weight container.

``w[n, k] = scale[n, g] * (q[n, k] - zero[n, g])`` with ``g = k // group_size``;
scales and zeros are fp16 and the zero point is a float (QA-LoRA merges need
fractional zeros). Codes are packed as described in :mod:`lorakern.formats.packing`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, packed_row_bytes, unpack_codes

__all__ = ["QuantizedWeight", "FORMAT_VERSION"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantizedWeight:
    """A packed low-bit weight of logical shape ``[out_features, in_features]``.

    Attributes:
        qweight: uint8 ``[N, K * bits / 8]`` packed codes (canonical layout).
        scales: fp16 ``[N, K / group_size]``.
        zeros: fp16 ``[N, K / group_size]`` (float zero points).
        bits: 1, 2, 3, 4 or 8 (1: sign weights, see :func:`lorakern.quant.quantize_sign`).
        group_size: 32, 64 or 128 (along K).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def __post_init__(self):
        self.validate()

    @property
    def shape(self) -> tuple[int, int]:
        """Logical ``(N, K)``."""
        return self.qweight.shape[0], self.qweight.shape[1] * 8 // self.bits

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        """Bytes of codes, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def bits_per_weight(self) -> float:
        """Average stored bits per weight, scales and zeros included."""
        N, K = self.shape
        return 8.0 * self.nbytes() / (N * K)

    def validate(self) -> None:
        """Check every field and size; raise ValueError/TypeError on any mismatch."""
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size}")
        q, s, z = self.qweight, self.scales, self.zeros
        if q.dtype != torch.uint8 or q.dim() != 2:
            raise TypeError(f"qweight must be a 2-D uint8 tensor, got {q.dtype} {tuple(q.shape)}")
        if (q.shape[1] * 8) % self.bits:
            raise ValueError(f"qweight has {q.shape[1]} bytes per row: not whole {self.bits}-bit codes")
        N, K = self.shape
        if K == 0 or K % self.group_size:
            raise ValueError(f"in_features={K} is not a positive multiple of group_size={self.group_size}")
        if packed_row_bytes(K, self.bits) != q.shape[1]:
            raise ValueError("qweight row size does not match in_features")
        want = (N, K // self.group_size)
        for name, t in (("scales", s), ("zeros", z)):
            if t.dtype != torch.float16:
                raise TypeError(f"{name} must be float16, got {t.dtype}")
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but qweight is on {q.device}")

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes, uint8 ``[N, K]``."""
        return unpack_codes(self.qweight, self.bits, self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[N, K]`` weight in plain torch (the reference)."""
        N, K = self.shape
        G = self.group_size
        q = self.codes().to(torch.float32).view(N, K // G, G)
        w = self.scales.float().unsqueeze(-1) * (q - self.zeros.float().unsqueeze(-1))
        return w.view(N, K).to(dtype)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.qweight.to(device), self.scales.to(device), self.zeros.to(device),
                               self.bits, self.group_size)
