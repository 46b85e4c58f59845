"""GWQ: a low-bit dense weight plus the most sensitive weights as sparse fp16 outliers.

:func:`quantize_with_outliers` takes an outlier mask (from any score in
:mod:`lorakern.quant.outliers`), quantizes the dense part with RTN or GPTQ with
the outliers left out of the group statistics, and stores at each outlier the
residual ``w - dequant(q)``, so ``dequant(q) + S`` reproduces it to fp16
precision and the dense kernel pass needs no mask.
"""
from __future__ import annotations

import torch

from ..formats.outliers import MAX_OUTLIER_K, GWQWeight, SparseOutliers
from ..formats.packing import pack_codes
from ..formats.quantized import QuantizedWeight
from .awq import clip_weight, search_clip
from .gptq import gptq_quantize
from .rtn import check_dense_weight, round_codes, rtn_params

__all__ = ["DENSE_QUANTIZERS", "quantize_dense", "quantize_with_outliers"]

# "awq": RTN after AWQ's clipping search; "awq_gptq": GPTQ. Both expect weights already multiplied by AWQ's
# per-channel scales (lorakern.models.awq folds them into the model) and the Hessian of the scaled inputs.
DENSE_QUANTIZERS = ("rtn", "gptq", "awq", "awq_gptq")


def _check(w, bits, group_size):
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    check_dense_weight(w, group_size)


def quantize_dense(w: torch.Tensor, bits: int, group_size: int, dense: str = "rtn", hessian=None,
                   exclude: torch.Tensor | None = None, act_order: bool = False, percdamp: float = 0.01):
    """Dense group-wise quantization by ``dense`` (:data:`DENSE_QUANTIZERS`: RTN, GPTQ, RTN after AWQ's
    clipping search, or GPTQ for AWQ-scaled weights), with ``exclude`` left out of the statistics. Returns
    ``(QuantizedWeight, w_final)``; ``w_final`` is w for RTN, the clipped w for "awq" (outliers unchanged) and
    the error-updated weights for GPTQ (see :func:`gptq_quantize`).

    Raises:
        ValueError: an unknown quantizer, a missing Hessian for the ones that need it, bad bits or shapes.
    """
    _check(w, bits, group_size)
    w = w.detach().float().cpu()
    if dense in ("gptq", "awq", "awq_gptq") and hessian is None:
        raise ValueError(f"dense={dense!r} needs the layer's input Hessian")
    if dense == "awq":
        w = clip_weight(w, search_clip(w, hessian, bits, group_size, exclude), group_size, exclude)
        dense = "rtn"
    if dense == "rtn":
        s, z = rtn_params(w, bits, group_size, exclude)
        q, wf = round_codes(w, s, z, bits), w
    elif dense in ("gptq", "awq_gptq"):
        q, s, z, wf = gptq_quantize(w, hessian, bits, group_size, exclude=exclude, act_order=act_order,
                                    percdamp=percdamp)
    else:
        raise ValueError(f"unknown dense quantizer {dense!r} (one of {DENSE_QUANTIZERS})")
    return QuantizedWeight(pack_codes(q, bits, group_size), s.contiguous(), z.contiguous(), bits, group_size), wf


def quantize_with_outliers(w: torch.Tensor, mask: torch.Tensor, bits: int = 4, group_size: int = 128,
                           dense: str = "rtn", hessian=None, act_order: bool = False,
                           percdamp: float = 0.01) -> GWQWeight:
    """A :class:`GWQWeight`: ``mask`` (bool ``[N, K]``) kept as fp16 outliers, the
    rest quantized by ``dense`` ("rtn" or "gptq")."""
    _check(w, bits, group_size)
    N, K = w.shape
    if K > MAX_OUTLIER_K:
        raise ValueError(f"K={K} exceeds {MAX_OUTLIER_K}: outlier columns are uint16")
    if mask.shape != (N, K) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool {(N, K)}, got {mask.dtype} {tuple(mask.shape)}")
    mask = mask.cpu()
    qw, wf = quantize_dense(w, bits, group_size, dense, hessian, mask, act_order, percdamp)
    residual = wf - qw.dequantize(torch.float32)
    return GWQWeight(qw, SparseOutliers.from_mask(mask, residual))
