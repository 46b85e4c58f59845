"""Plain-torch reference implementations: the ground truth for tests, and the
default backend for any device without its own kernels."""
from __future__ import annotations

import torch

from ..formats.packing import unpack_codes
from .schemas import check_qweight, check_quant_matmul, lib

__all__ = ["act_block", "dequantize", "quant_matmul", "quant_matmul_int8_act"]


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


def quant_matmul_int8_act(x, qweight, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """Exact model of the CPU kernels' numerics (fp64): activations quantized to
    int8 per block of ``act_block(group_size)`` values with scale max|x|/127
    (round half to even), integer dot products with the codes, zero points
    applied with the exact sum of x over each group."""
    N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    G, B = group_size, act_block(group_size)
    xf = x.reshape(-1, K).float()
    xb = xf.view(-1, K // B, B)
    amax = xb.abs().amax(-1, keepdim=True)
    xs = (amax / 127.0).double().view(-1, K // G, G // B)  # [M, ng, blocks per group]
    # true division (torch evaluates `127.0 / t` as reciprocal(t) * 127, which rounds differently)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    xq = torch.round(xb * inv).clamp(-127, 127).double().view(-1, K // G, G // B, B)
    q = unpack_codes(qweight, bits, G, K).double().view(N, K // G, G // B, B)
    dots = torch.einsum("mgtb,ngtb->mngt", xq, q)  # exact in fp64
    s = scales.double().unsqueeze(0)
    z = zeros.double().unsqueeze(0)
    y = ((dots * xs.unsqueeze(1)).sum(-1) * s).sum(-1)
    y = y - (s * z * xf.double().view(-1, K // G, G).sum(-1).unsqueeze(1)).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.view(*x.shape[:-1], N)


# Any device without a dedicated kernel runs the reference.
lib.impl("quant_matmul", quant_matmul, "CompositeExplicitAutograd")
lib.impl("dequantize", dequantize, "CompositeExplicitAutograd")
