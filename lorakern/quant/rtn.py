"""Round-to-nearest group-wise asymmetric quantization."""
from __future__ import annotations

import torch

from ..formats.packing import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, pack_codes
from ..formats.quantized import QuantizedWeight

__all__ = ["check_dense_weight", "quantize_rtn", "quantize_sign", "round_codes", "rtn_params"]


def check_dense_weight(w: torch.Tensor, group_size: int) -> None:
    """ValueError unless w is a finite 2-D weight whose K is a multiple of a supported group size."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(w.shape)}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if w.shape[1] % group_size:
        raise ValueError(f"in_features={w.shape[1]} is not a multiple of group_size={group_size}")
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN or Inf values")


def rtn_params(w: torch.Tensor, bits: int, group_size: int,
               exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scales, zeros) of shape [N, K/G] for RTN over each group.

    The range is widened to include 0 (as GPTQ does), so zeros lie in
    [0, 2**bits - 1] and stay exact enough in fp16. ``exclude`` (bool, like w)
    leaves entries out of the group statistics (GWQ's outliers).
    """
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group_size, group_size)
    qmax = (1 << bits) - 1
    if exclude is not None:
        ex = exclude.reshape(N, K // group_size, group_size)
        wmin = g.masked_fill(ex, float("inf")).amin(-1).clamp(max=0)
        wmax = g.masked_fill(ex, float("-inf")).amax(-1).clamp(min=0)
    else:
        wmin = g.amin(-1).clamp(max=0)
        wmax = g.amax(-1).clamp(min=0)
    scale = (wmax - wmin) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale16 = scale.half()
    if not torch.isfinite(scale16).all():
        raise ValueError("weights too large for fp16 scales")
    # a scale that underflowed to 0 in fp16 is replaced by the smallest normal
    scale16 = torch.where(scale16 > 0, scale16, torch.full_like(scale16, 6.1035e-05))
    zero16 = (-wmin / scale16.float()).half()
    return scale16, zero16


def quantize_rtn(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> QuantizedWeight:
    """Quantize a dense weight ``[N, K]`` to a :class:`QuantizedWeight` by RTN.

    Codes are rounded against the fp16-rounded scale and zero actually stored,
    so ``dequantize()`` is the exact value the kernels use.
    """
    if bits not in SUPPORTED_BITS or bits == 1:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS[1:]} (1 bit: quantize_sign), got {bits}")
    check_dense_weight(w, group_size)
    scales, zeros = rtn_params(w, bits, group_size)
    q = round_codes(w, scales, zeros, bits)
    return QuantizedWeight(pack_codes(q, bits, group_size), scales.contiguous(), zeros.contiguous(), bits, group_size)


def round_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``clamp(round(w / s + z), 0, 2^bits - 1)`` for group-wise fp16 (scales, zeros)."""
    N, K = w.shape
    G = K // scales.shape[1]
    g = w.detach().float().reshape(N, K // G, G)
    q = torch.round(g / scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1))
    return q.clamp(0, (1 << bits) - 1).to(torch.uint8).reshape(N, K)


def quantize_sign(w: torch.Tensor, group_size: int = 128) -> QuantizedWeight:
    """1-bit sign quantization: ``w ~ s_g * sign(w)`` with ``s_g = mean|w|`` per group
    (LoRAQuant's low part). Stored as a 1-bit :class:`QuantizedWeight` with code
    ``q = (w >= 0)``, scale ``2 * s_g`` and zero ``0.5``, so that
    ``scale * (q - zero) = +-s_g`` and every kernel runs it unchanged."""
    check_dense_weight(w, group_size)
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group_size, group_size)
    scale = (2 * g.abs().mean(-1)).half()
    if not torch.isfinite(scale).all():
        raise ValueError("weights too large for fp16 scales")
    q = (g >= 0).to(torch.uint8).reshape(N, K)
    zeros = torch.full_like(scale, 0.5)
    return QuantizedWeight(pack_codes(q, 1, group_size), scale.contiguous(), zeros, 1, group_size)
