"""lorakern's torch custom ops (namespace ``lorakern``).

* ``torch.ops.lorakern.quant_matmul(x, qweight, scales, zeros, bits, group_size, bias=None)``
  -> ``x @ W^T (+ bias)``, shape ``[..., N]``, dtype of x.
* ``torch.ops.lorakern.dequantize(qweight, scales, zeros, bits, group_size)`` -> fp32 ``[N, K]``.
* ``torch.ops.lorakern.gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values,
  bias=None)`` -> ``x @ (W + S)^T (+ bias)`` with S the CSR outliers (:class:`lorakern.formats.SparseOutliers`).

CPU tensors run the C++ kernels, CUDA tensors the Triton kernels, any other
device the plain-torch reference. All are traceable by torch.compile.
"""
from . import schemas  # noqa: F401  (defines the ops; must come first)
from . import reference  # noqa: F401
from . import cpu  # noqa: F401
from . import cuda  # noqa: F401
import torch


def quant_matmul(x, qweight, scales, zeros, bits: int, group_size: int, bias=None):
    """``x[..., K] @ W^T (+ bias)`` for a packed weight; see :mod:`lorakern.ops`."""
    return torch.ops.lorakern.quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)


def dequantize(qweight, scales, zeros, bits: int, group_size: int):
    """Dense fp32 ``[N, K]`` weight of a packed weight."""
    return torch.ops.lorakern.dequantize(qweight, scales, zeros, bits, group_size)


def gwq_matmul(x, qweight, scales, zeros, bits: int, group_size: int, row_ptr, col_idx, values, bias=None):
    """``x[..., K] @ (W + S)^T (+ bias)``: a packed weight plus its CSR outliers, one fused pass."""
    return torch.ops.lorakern.gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values,
                                         bias)


__all__ = ["quant_matmul", "dequantize", "gwq_matmul"]
