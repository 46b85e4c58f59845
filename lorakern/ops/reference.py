"""Plain-torch reference implementations: the ground truth for tests, and the
default backend for any device without its own kernels."""
from __future__ import annotations

import torch

from ..formats.packing import unpack_codes
from ..formats.outliers import SparseOutliers
from .schemas import (check_gwq_matmul, check_lora_mixed, check_quant_matmul, check_quant_matmul_lora, check_qweight,
                      lib)

__all__ = ["act_block", "dequantize", "gwq_matmul", "gwq_matmul_int8_act", "lora_delta", "lora_mixed",
           "lora_mixed_int8_act", "outliers_dense", "quant_matmul", "quant_matmul_int8_act", "quant_matmul_lora",
           "quant_matmul_lora_int8_act", "quantize_activations_int8"]


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


def _lora_factors(adapter, bits_hi: int, group_a: int, group_b: int):
    """Dequantized ``A [r, K]`` (hi rows, then lo rows) and ``B'^T [r, N]`` of the 12 adapter tensors."""
    parts = [dequantize(*adapter[3 * i: 3 * i + 3], bits, G) for i, (bits, G) in
             enumerate(((bits_hi, group_a), (bits_hi, group_b), (1, group_a), (1, group_b)))]
    return torch.cat([parts[0], parts[2]], 0), torch.cat([parts[1], parts[3]], 0)


def lora_delta(x, adapter, bits_hi: int, group_a: int, group_b: int, scale: float, xhat=None) -> torch.Tensor:
    """``scale * (x A^T) B'^T`` in fp64 (x: ``[..., K]``), the adapter's contribution. ``xhat`` replaces x
    in the shrink (the int8 model)."""
    A, Bt = _lora_factors(adapter, bits_hi, group_a, group_b)
    K = A.shape[1]
    xs = (x if xhat is None else xhat).reshape(-1, K).double()
    t = xs @ A.double().t()
    return (scale * (t @ Bt.double())).view(*x.shape[:-1], Bt.shape[1])


def lora_mixed(x, base, adapter, bits_hi: int, group_a: int, group_b: int, scale: float) -> torch.Tensor:
    """``base + scale * ((x A_hi^T) B_hi'^T + (x A_lo^T) B_lo'^T)`` in fp32, cast to base's dtype."""
    check_lora_mixed(x, base, adapter, bits_hi, group_a, group_b, scale)
    return (base.float() + lora_delta(x.float(), adapter, bits_hi, group_a, group_b, scale).float()).to(base.dtype)


def lora_mixed_int8_act(x, base, adapter, bits_hi: int, group_a: int, group_b: int, scale: float) -> torch.Tensor:
    """Exact model (fp64) of the CPU lora_mixed: the shrink on the int8 activations of
    :func:`quantize_activations_int8` (group ``group_a``), everything else exact."""
    check_lora_mixed(x, base, adapter, bits_hi, group_a, group_b, scale)
    xhat = quantize_activations_int8(x, group_a)
    return base.double() + lora_delta(x, adapter, bits_hi, group_a, group_b, scale, xhat=xhat)


def quant_matmul_lora(x, qweight, scales, zeros, bits: int, group_size: int, bias, adapter, bits_hi: int,
                      group_a: int, group_b: int, scale: float) -> torch.Tensor:
    """``x @ W^T (+ bias) + scale * (x A^T) B'^T``: a quantized layer and its compressed adapter, in fp32."""
    check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                            scale)
    y = quant_matmul(x.float(), qweight, scales, zeros, bits, group_size, bias)
    return (y + lora_delta(x.float(), adapter, bits_hi, group_a, group_b, scale).float()).to(x.dtype)


def quant_matmul_lora_int8_act(x, qweight, scales, zeros, bits: int, group_size: int, bias, adapter, bits_hi: int,
                               group_a: int, group_b: int, scale: float) -> torch.Tensor:
    """Exact model (fp64) of the CPU quant_matmul_lora."""
    check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                            scale)
    y = quant_matmul_int8_act(x, qweight, scales, zeros, bits, group_size, bias)
    xhat = quantize_activations_int8(x, group_a)
    return y + lora_delta(x, adapter, bits_hi, group_a, group_b, scale, xhat=xhat)


# Any device without a dedicated kernel runs the reference.
lib.impl("quant_matmul", quant_matmul, "CompositeExplicitAutograd")
lib.impl("dequantize", dequantize, "CompositeExplicitAutograd")
lib.impl("gwq_matmul", gwq_matmul, "CompositeExplicitAutograd")
lib.impl("lora_mixed", lora_mixed, "CompositeExplicitAutograd")
lib.impl("quant_matmul_lora", quant_matmul_lora, "CompositeExplicitAutograd")
