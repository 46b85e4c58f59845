"""QuantLinear: a drop-in replacement for nn.Linear with a packed low-bit weight."""
from __future__ import annotations

import os

import torch
from torch import nn

from ..formats.io import FormatError, load_quantized, save_quantized
from ..formats.quantized import QuantizedWeight
from .. import ops
from ..quant.rtn import quantize_rtn
from .storage import FormatBuffers

__all__ = ["QuantLinear"]


class QuantLinear(FormatBuffers):
    """``y = x @ W^T + b`` with W stored group-wise quantized (docs/formats.md).

    Buffers: ``qweight`` (uint8 packed codes), ``scales`` and ``zeros`` (fp16),
    and ``bias`` (fp32, optional). forward runs ``torch.ops.lorakern.quant_matmul``:
    the C++ kernels on CPU, Triton on CUDA. The output dtype is the input's.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        weight.validate()
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.bits = weight.bits
        self.group_size = weight.group_size
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = bias.detach().to(torch.float32, copy=True)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128) -> "QuantLinear":
        """Quantize an ``nn.Linear`` by round-to-nearest."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        w = quantize_rtn(linear.weight.detach().float().cpu(), bits, group_size).to(linear.weight.device)
        return cls(w, linear.bias)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The packed weight as a :class:`QuantizedWeight`."""
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 weight [out_features, in_features]."""
        return torch.ops.lorakern.dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quant_matmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.bias)

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (codes, scales, zeros, bias, metadata)."""
        extra = {"bias": self.bias} if self.bias is not None else {}
        save_quantized(path, {"weight": self.quantized_weight}, extra_tensors=extra,
                       extra_metadata={"module": "QuantLinear"})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "QuantLinear":
        """Read a file written by :meth:`save`; every field is validated."""
        weights, others, meta = load_quantized(path)
        if set(weights) != {"weight"} or set(others) - {"bias"}:
            raise FormatError(f"{path}: not a QuantLinear file (weights {sorted(weights)}, tensors {sorted(others)})")
        return cls(weights["weight"], others.get("bias")).to(device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
