"""QA-LoRA's merge (Xu et al., "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models",
arXiv 2309.14717, Sec. 3.3): an adapter whose input is average-pooled over the base's quantization groups adds
a constant to every weight of a group, which folds into that group's zero point.

With ``W[n, k] = s[n, g] * (q[n, k] - z[n, g])`` (g = k // G) and the adapter's update
``scale * B @ A @ pool_G`` (``A [r, K / G]``, ``B [N, r]``, pool = the mean over each group),
every weight of group g of row n grows by ``c[n, g] = scale * (B @ A)[n, g] / G``, so

    z'[n, g] = z[n, g] - c[n, g] / s[n, g] = z[n, g] - scale * (B A)[n, g] / (G * s[n, g]).

lorakern's format stores fp16 zeros, so the merged layer differs from the unmerged one only by z''s fp16
rounding: per output, ``|y_merged - y_unmerged| <= sum_g |s[n, g]| * |fp16(z') - z'| * |sum_{k in g} x_k|``
(:func:`merge_error_bound`), with ``|fp16(z') - z'| <= 2^-11 |z'|`` (2^-25 below fp16's normal range).
"""
from __future__ import annotations

import torch

from ..formats.quantized import QuantizedWeight

__all__ = ["FP16_MAX", "merge_error_bound", "merge_qalora", "merged_zeros"]

FP16_MAX = 65504.0


def merged_zeros(scales: torch.Tensor, zeros: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                 group_size: int) -> torch.Tensor:
    """The exact (float64) merged zero points ``z - scale * (B A) / (G * s)``, ``[N, K / G]``.

    Args:
        scales, zeros: the base's fp16 ``[N, K / G]``.
        A: ``[r, K / G]`` (pooling = the mean over each group), B: ``[N, r]``; any float dtype.
        scale: the adapter's ``alpha / r``.

    Raises:
        ValueError: shapes that do not fit, non-finite adapter values, a group whose scale is 0 while the
            adapter changes it (nothing to fold into), or a merged zero beyond fp16's range (+-65504).
    """
    N, ng = scales.shape
    if zeros.shape != scales.shape:
        raise ValueError(f"lorakern: zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} differ")
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != ng or B.shape[0] != N or A.shape[0] != B.shape[1]:
        raise ValueError(f"lorakern: a QA-LoRA adapter A {tuple(A.shape)} / B {tuple(B.shape)} does not fit a base of "
                         f"{N} rows and {ng} groups (A must be [r, {ng}], B [{N}, r])")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()) or not (scale == scale and abs(scale) < float("inf")):
        raise ValueError("lorakern: the QA-LoRA adapter has NaN or Inf values (or scale)")
    c = scale * (B.double().cpu() @ A.double().cpu()) / group_size
    s = scales.double().cpu()
    dead = (s == 0) & (c != 0)
    if dead.any():
        n, g = (int(v) for v in dead.nonzero()[0])
        raise ValueError(f"lorakern: cannot merge: row {n} group {g} has scale 0 (a constant group) but the adapter "
                         "changes it; keep this adapter unmerged")
    z = zeros.double().cpu() - torch.where(s == 0, torch.zeros_like(c), c / torch.where(s == 0, 1.0, s))
    big = z.abs() > FP16_MAX
    if big.any():
        n, g = (int(v) for v in big.nonzero()[0])
        raise ValueError(f"lorakern: cannot merge: the merged zero of row {n} group {g} is {float(z[n, g]):.6g}, "
                         f"beyond fp16's range (+-{FP16_MAX:g}); keep this adapter unmerged")
    return z


def merge_qalora(weight: QuantizedWeight, A: torch.Tensor, B: torch.Tensor, scale: float) -> QuantizedWeight:
    """The packed weight with a QA-LoRA adapter folded into its zeros (codes and scales shared, zeros new fp16).
    See :func:`merged_zeros` for the arguments and errors."""
    z = merged_zeros(weight.scales, weight.zeros, A, B, scale, weight.group_size)
    return QuantizedWeight(weight.qweight, weight.scales, z.to(torch.float16).to(weight.zeros.device), weight.bits,
                           weight.group_size)


def merge_error_bound(scales: torch.Tensor, exact_zeros: torch.Tensor, stored_zeros: torch.Tensor, x: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    """The bound ``sum_g |s| * |stored z' - exact z'| * |sum over the group of x|`` on ``|merged - unmerged|`` for
    activations ``x [..., K]``: ``[..., N]`` (float64)."""
    gx = x.double().reshape(*x.shape[:-1], -1, group_size).sum(-1).abs()  # [..., ng]
    dz = (stored_zeros.double() - exact_zeros.double()).abs() * scales.double().abs()  # [N, ng]
    return gx @ dz.t().to(gx.device)

