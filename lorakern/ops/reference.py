"""Plain-torch reference implementations: the ground truth for tests, and the
default backend for any device without its own kernels."""
from __future__ import annotations

import torch

from ..formats.packing import unpack_codes
from ..formats.outliers import SparseOutliers
from .schemas import check_gwq_matmul, check_qweight, check_quant_matmul, lib

__all__ = ["act_block", "dequantize", "gwq_matmul", "gwq_matmul_int8_act", "outliers_dense", "quant_matmul",
           "quant_matmul_int8_act", "quantize_activations_int8"]


def dequantize(qweight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """fp32 [N, K] = scales * (codes - zeros), group-wise."""
    N, K = check_qweight(qweight, scales, zeros, bits, group_size)
    q = unpack_codes(qweight, bits, group_size, K).to(torch.float32).view(N, K // group_size, group_size)
    w = scales.float().unsqueeze(-1) * (q - zeros.float().unsqueeze(-1))
    return w.view(N, K)


def quant_matmul(x, qweight, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """x @ dequantize(W)^T (+ bias) in fp32, cast to x.dtype."""
    check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    w = dequantize(qweight, scales, zeros, bits, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def act_block(group_size: int) -> int:
    """Activation quantization block of the CPU kernels: 64, or the group if smaller."""
    return min(group_size, 64)


def quantize_activations_int8(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The CPU kernels' activation quantization, dequantized: each block of
    ``act_block(group_size)`` values along the last dim is rounded (half to even)
    to int8 with scale max|x|/127. Returns fp32 ``xhat``."""
    K = x.shape[-1]
    B = act_block(group_size)
    xb = x.reshape(-1, K // B, B).float()
    amax = xb.abs().amax(-1, keepdim=True)
    # true division (torch evaluates `127.0 / t` as reciprocal(t) * 127, which rounds differently)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    xq = torch.round(xb * inv).clamp(-127, 127)
    return (xq * (amax / 127.0)).view(x.shape)


def quant_matmul_int8_act(x, qweight, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """Exact model (fp64) of the CPU kernels: ``xhat @ W^T (+ bias)`` with
    ``xhat = quantize_activations_int8(x)``. The kernels differ from it only by
    fp32 rounding."""
    N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    xhat = quantize_activations_int8(x, group_size).reshape(-1, K).double()
    y = xhat @ dequantize(qweight, scales, zeros, bits, group_size).double().t()
    if bias is not None:
        y = y + bias.double()
    return y.view(*x.shape[:-1], N)


def outliers_dense(row_ptr, col_idx, values, N: int, K: int) -> torch.Tensor:
    """The CSR outliers as a dense fp32 ``[N, K]`` (contents fully validated)."""
    return SparseOutliers(row_ptr, col_idx, values, (N, K)).to_dense(torch.float32)


def gwq_matmul(x, qweight, scales, zeros, bits: int, group_size: int, row_ptr, col_idx, values,
               bias=None) -> torch.Tensor:
    """``x @ (dequantize(W) + S)^T (+ bias)`` in fp32, cast to x.dtype."""
    N, K = check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)
    w = dequantize(qweight, scales, zeros, bits, group_size) + outliers_dense(row_ptr, col_idx, values, N, K)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gwq_matmul_int8_act(x, qweight, scales, zeros, bits: int, group_size: int, row_ptr, col_idx, values,
                        bias=None) -> torch.Tensor:
    """Exact model (fp64) of the CPU gwq kernels: the dense part on the int8
    activations (:func:`quant_matmul_int8_act`), the outliers on the unquantized ones."""
    N, K = check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)
    y = quant_matmul_int8_act(x, qweight, scales, zeros, bits, group_size, bias)
    s = outliers_dense(row_ptr, col_idx, values, N, K).double()
    return y + (x.reshape(-1, K).double() @ s.t()).view(*x.shape[:-1], N)


# Any device without a dedicated kernel runs the reference.
lib.impl("quant_matmul", quant_matmul, "CompositeExplicitAutograd")
lib.impl("dequantize", dequantize, "CompositeExplicitAutograd")
lib.impl("gwq_matmul", gwq_matmul, "CompositeExplicitAutograd")
