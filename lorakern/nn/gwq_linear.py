"""GWQLinear: a drop-in nn.Linear with a low-bit dense weight plus sparse fp16 outliers."""
from __future__ import annotations

import os

import torch
from torch import nn

from ..formats.io import FormatError, load_quantized, save_quantized
from ..formats.outliers import GWQWeight, SparseOutliers
from ..formats.quantized import QuantizedWeight
from .. import ops
from .storage import FormatBuffers

__all__ = ["GWQLinear"]


class GWQLinear(FormatBuffers):
    """``y = x @ (W_q + S)^T + b``: W_q group-wise quantized, S the CSR outliers
    (docs/formats.md). forward runs ``torch.ops.lorakern.gwq_matmul`` (one fused
    pass: C++ on CPU, Triton on CUDA); the output dtype is the input's.

    Buffers: ``qweight``, ``scales``, ``zeros`` (the dense part), ``row_ptr``,
    ``col_idx``, ``values`` (the outliers) and ``bias`` (fp32, optional).
    Build one with :func:`lorakern.quant.quantize_with_outliers` and
    ``GWQLinear(weight, bias)``, or quantize a whole model with
    :func:`lorakern.quantize_model` (method "gwq" and the outlier baselines).
    """

    def __init__(self, weight: GWQWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, GWQWeight):
            raise TypeError(f"expected a GWQWeight, got {type(weight).__name__}")
        weight.validate()
        d, o = weight.dense, weight.outliers
        self.out_features, self.in_features = d.shape
        self.bits, self.group_size = d.bits, d.group_size
        for name in ("qweight", "scales", "zeros"):
            self.register_buffer(name, getattr(d, name))
        for name in ("row_ptr", "col_idx", "values"):
            self.register_buffer(name, getattr(o, name))
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = bias.detach().to(torch.float32, copy=True)
        self.register_buffer("bias", bias)

    @property
    def weight_gwq(self) -> GWQWeight:
        """The stored weight as a :class:`GWQWeight`."""
        return GWQWeight(QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size),
                         SparseOutliers(self.row_ptr, self.col_idx, self.values, (self.out_features, self.in_features)))

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 weight (dense part + outliers)."""
        return self.weight_gwq.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gwq_matmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.row_ptr,
                              self.col_idx, self.values, self.bias)

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (dense codes, outliers, bias, metadata)."""
        extra = {"bias": self.bias} if self.bias is not None else {}
        save_quantized(path, {"weight": self.weight_gwq}, extra_tensors=extra,
                       extra_metadata={"module": "GWQLinear"})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "GWQLinear":
        """Read a file written by :meth:`save`; every field is validated."""
        weights, others, _ = load_quantized(path)
        if set(weights) != {"weight"} or set(others) - {"bias"} or not isinstance(weights["weight"], GWQWeight):
            raise FormatError(f"{path}: not a GWQLinear file (weights {sorted(weights)}, tensors {sorted(others)})")
        return cls(weights["weight"], others.get("bias")).to(device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, outliers={self.nnz}, bias={self.bias is not None}")
