"""Plain-torch reference implementations: the ground truth for tests, and the
default backend for any device without its own kernels."""
from __future__ import annotations

import torch

from ..formats.packing import unpack_codes
from .schemas import check_qweight, check_quant_matmul, lib

__all__ = ["dequantize", "quant_matmul", "quant_matmul_int8_act"]


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


def quant_matmul_int8_act(x, qweight, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """Exact model of the CPU kernels' numerics (fp64): activations quantized per
    (row, group) to int8 with scale max|x|/127 (round half to even), integer dot
    products with the codes, zero points applied with the exact sum of x."""
    N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    G = group_size
    xf = x.reshape(-1, K).float()
    xg = xf.view(-1, K // G, G)
    amax = xg.abs().amax(-1, keepdim=True)
    xs = amax / 127.0
    # true division (torch evaluates `127.0 / t` as reciprocal(t) * 127, which rounds differently)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    xq = torch.round(xg * inv).clamp(-127, 127).double()
    q = unpack_codes(qweight, bits, G, K).double().view(N, K // G, G)
    dots = torch.einsum("mgi,ngi->mng", xq, q)  # exact in fp64
    s = scales.double().unsqueeze(0)
    z = zeros.double().unsqueeze(0)
    y = (dots * s * xs.double().squeeze(-1).unsqueeze(1)).sum(-1)
    y = y - (s * z * xg.double().sum(-1).unsqueeze(1)).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.view(*x.shape[:-1], N)


# Any device without a dedicated kernel runs the reference.
lib.impl("quant_matmul", quant_matmul, "CompositeExplicitAutograd")
lib.impl("dequantize", dequantize, "CompositeExplicitAutograd")
