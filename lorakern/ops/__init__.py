"""lorakern's torch custom ops (namespace ``lorakern``), their contracts in :mod:`.schemas`.

=======================  ===================================================================
op                       computes (shapes and dtypes: docs/formats.md, "Ops")
=======================  ===================================================================
quant_matmul             ``x @ W^T (+ bias)`` for a packed low-bit weight
dequantize               the dense fp32 ``[N, K]`` weight
gwq_matmul               ``x @ (W + S)^T (+ bias)``: packed weight plus CSR fp16 outliers
quant_matmul_grad_input  ``grad @ W``: quant_matmul's gradient with respect to x (:mod:`.autograd`)
gwq_matmul_grad_input    ``grad @ (W + S)``: gwq_matmul's gradient with respect to x
quant_matmul_qalora      ``quant_matmul`` plus an unmerged QA-LoRA adapter on the group-pooled input
lora_mixed               ``base + scale * (x A'^T) B'`` for a LoRAQuant-compressed adapter
quant_matmul_lora        ``quant_matmul`` and ``lora_mixed`` of one layer in one call
lora_shrink              per-token ``t = w * scale * x A^T`` over an adapter bank (multi-adapter)
lora_expand              ``y = base + t B^T`` scattered back per token
multi_lora               ``lora_shrink`` then ``lora_expand`` in one call
multi_lora_slices        ``multi_lora`` for several output slices of one input (fused q/k/v)
=======================  ===================================================================

CPU tensors run the C++ kernels (:mod:`.cpu`), CUDA tensors the Triton kernels (:mod:`.cuda`), any
other device the plain-torch reference (:mod:`.reference`). All are traceable by torch.compile. The
functions below call the ops; on plain CPU tensors outside torch.compile they skip the dispatcher
(:mod:`.registry`).
"""
from . import schemas  # noqa: F401  (defines the ops; must come first)
from . import reference  # noqa: F401
from . import cpu  # noqa: F401
from . import cuda  # noqa: F401
from . import autograd  # noqa: F401
from .registry import call, eager_cpu, eager_helper

import torch


def quant_matmul(x, qweight, scales, zeros, bits: int, group_size: int, bias=None):
    """``x[..., K] @ W^T (+ bias)`` for a packed weight (:class:`~lorakern.formats.QuantizedWeight` fields);
    shape ``[..., N]``, dtype of x (fp32/fp16/bf16)."""
    return call("quant_matmul", x, qweight, scales, zeros, bits, group_size, bias)


def dequantize(qweight, scales, zeros, bits: int, group_size: int):
    """Dense fp32 ``[N, K]`` weight of a packed weight."""
    return torch.ops.lorakern.dequantize(qweight, scales, zeros, bits, group_size)


def gwq_matmul(x, qweight, scales, zeros, bits: int, group_size: int, row_ptr, col_idx, values, bias=None):
    """``x[..., K] @ (W + S)^T (+ bias)``: a packed weight plus its CSR outliers
    (:class:`~lorakern.formats.SparseOutliers`), one fused pass; shape ``[..., N]``, dtype of x."""
    return call("gwq_matmul", x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)


def quant_matmul_qalora(x, qweight, scales, zeros, bits: int, group_size: int, bias, A, Bt, scale: float):
    """``x[..., K] @ W^T (+ bias) + scale * (pool_G(x) A^T) Bt``: a packed weight and an unmerged QA-LoRA
    adapter (``A [r, K / group_size]``, ``Bt [r, N]``, pooling = the mean over each quantization group) in one
    call; shape ``[..., N]``, dtype of x. Inference only (no autograd)."""
    return call("quant_matmul_qalora", x, qweight, scales, zeros, bits, group_size, bias, A, Bt, scale)


__all__ = ["dequantize", "eager_cpu", "eager_helper", "gwq_matmul", "quant_matmul", "quant_matmul_qalora"]
