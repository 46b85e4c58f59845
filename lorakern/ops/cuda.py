"""CUDA backend: Triton kernels (imported lazily, at the first CUDA call)."""
from __future__ import annotations

import torch

from .schemas import check_gwq_matmul, check_lora_mixed, check_quant_matmul, check_quant_matmul_lora, check_qweight

__all__ = ["quant_matmul_cuda", "gwq_matmul_cuda", "dequantize_cuda", "lora_mixed_cuda", "quant_matmul_lora_cuda"]


def quant_matmul_cuda(x, qweight, scales, zeros, bits, group_size, bias=None):
    check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    from ..triton.quant_matmul import quant_matmul_triton
    return quant_matmul_triton(x, qweight, scales, zeros, bits, group_size, bias)


def gwq_matmul_cuda(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias=None):
    check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)
    from ..triton.gwq_matmul import gwq_matmul_triton
    return gwq_matmul_triton(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)


def dequantize_cuda(qweight, scales, zeros, bits, group_size):
    check_qweight(qweight, scales, zeros, bits, group_size)
    from ..triton.quant_matmul import dequantize_triton
    return dequantize_triton(qweight, scales, zeros, bits, group_size)


def lora_mixed_cuda(x, base, adapter, bits_hi, group_a, group_b, scale):
    check_lora_mixed(x, base, adapter, bits_hi, group_a, group_b, scale)
    from ..triton.lora_mixed import lora_mixed_triton
    return lora_mixed_triton(x, base, adapter, bits_hi, group_a, group_b, scale)


def quant_matmul_lora_cuda(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                           scale):
    check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                            scale)
    from ..triton.lora_mixed import quant_matmul_lora_triton
    return quant_matmul_lora_triton(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a,
                                    group_b, scale)


torch.library.register_kernel("lorakern::lora_mixed", "cuda", lora_mixed_cuda)
torch.library.register_kernel("lorakern::quant_matmul_lora", "cuda", quant_matmul_lora_cuda)
torch.library.register_kernel("lorakern::quant_matmul", "cuda", quant_matmul_cuda)
torch.library.register_kernel("lorakern::dequantize", "cuda", dequantize_cuda)
torch.library.register_kernel("lorakern::gwq_matmul", "cuda", gwq_matmul_cuda)
