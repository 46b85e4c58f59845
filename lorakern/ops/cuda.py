"""CUDA backend: Triton kernels, registered with ``@kernel(op, "cuda")``.

The Triton modules are imported inside each function, at the first CUDA call: importing triton and
compiling its kernels costs seconds, which a CPU-only user should never pay (a lazy import kept on
purpose, for import time)."""
from __future__ import annotations

import torch

from .registry import kernel
from .schemas import check_grad_input, check_outliers, check_quant_matmul_qalora, check_multi_lora_slices, check_lora_expand, check_lora_shrink, check_multi_lora, check_gwq_matmul, check_lora_mixed, check_quant_matmul, check_quant_matmul_lora, check_qweight

__all__ = ["gwq_matmul_grad_input_cuda", "quant_matmul_grad_input_cuda", "quant_matmul_qalora_cuda",
           "multi_lora_slices_cuda", "lora_expand_cuda", "lora_shrink_cuda", "multi_lora_cuda", "quant_matmul_cuda", "gwq_matmul_cuda", "dequantize_cuda", "lora_mixed_cuda", "quant_matmul_lora_cuda"]


@kernel("quant_matmul", "cuda")
def quant_matmul_cuda(x, qweight, scales, zeros, bits, group_size, bias=None):
    check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    from ..triton.quant_matmul import quant_matmul_triton
    return quant_matmul_triton(x, qweight, scales, zeros, bits, group_size, bias)


@kernel("gwq_matmul", "cuda")
def gwq_matmul_cuda(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias=None):
    check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)
    from ..triton.gwq_matmul import gwq_matmul_triton
    return gwq_matmul_triton(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)


@kernel("quant_matmul_grad_input", "cuda")
def quant_matmul_grad_input_cuda(grad, qweight, scales, zeros, bits, group_size):
    check_grad_input(grad, qweight, scales, zeros, bits, group_size)
    from ..triton.grad_input import grad_input_triton
    return grad_input_triton(grad, qweight, scales, zeros, bits, group_size)


@kernel("gwq_matmul_grad_input", "cuda")
def gwq_matmul_grad_input_cuda(grad, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values):
    N, K = check_grad_input(grad, qweight, scales, zeros, bits, group_size)
    check_outliers(row_ptr, col_idx, values, N, K, qweight.device)
    from ..triton.grad_input import grad_input_triton
    return grad_input_triton(grad, qweight, scales, zeros, bits, group_size, (row_ptr, col_idx, values))


@kernel("quant_matmul_qalora", "cuda")
def quant_matmul_qalora_cuda(x, qweight, scales, zeros, bits, group_size, bias, A, Bt, scale):
    check_quant_matmul_qalora(x, qweight, scales, zeros, bits, group_size, bias, A, Bt, scale)
    from ..triton.quant_matmul import quant_matmul_qalora_triton
    return quant_matmul_qalora_triton(x, qweight, scales, zeros, bits, group_size, bias, A, Bt, scale)


@kernel("dequantize", "cuda")
def dequantize_cuda(qweight, scales, zeros, bits, group_size):
    check_qweight(qweight, scales, zeros, bits, group_size)
    from ..triton.quant_matmul import dequantize_triton
    return dequantize_triton(qweight, scales, zeros, bits, group_size)


@kernel("lora_mixed", "cuda")
def lora_mixed_cuda(x, base, adapter, bits_hi, group_a, group_b, scale):
    check_lora_mixed(x, base, adapter, bits_hi, group_a, group_b, scale)
    from ..triton.lora_mixed import lora_mixed_triton
    return lora_mixed_triton(x, base, adapter, bits_hi, group_a, group_b, scale)


@kernel("quant_matmul_lora", "cuda")
def quant_matmul_lora_cuda(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                           scale):
    check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                            scale)
    from ..triton.lora_mixed import quant_matmul_lora_triton
    return quant_matmul_lora_triton(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a,
                                    group_b, scale)


@kernel("lora_shrink", "cuda")
def lora_shrink_cuda(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, max_count=-1):
    check_lora_shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    from ..triton.multi_lora import lora_shrink_triton
    return lora_shrink_triton(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank,
                              None if max_count < 0 else max_count)


@kernel("lora_expand", "cuda")
def lora_expand_cuda(t, base, bank, table, scales, group_a, group_b, segments, tokens, max_count=-1, mixture=True):
    check_lora_expand(t, base, bank, table, scales, group_a, group_b, segments, tokens)
    from ..triton.multi_lora import lora_expand_triton
    return lora_expand_triton(t, base, bank, table, scales, group_a, group_b, segments, tokens,
                              None if max_count < 0 else max_count, mixture)


@kernel("multi_lora", "cuda")
def multi_lora_cuda(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank,
                    max_count=-1, mixture=True):
    check_multi_lora(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    from ..triton.multi_lora import multi_lora_triton
    return multi_lora_triton(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank,
                             None if max_count < 0 else max_count, mixture)


@kernel("multi_lora_slices", "cuda")
def multi_lora_slices_cuda(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank,
                           max_count=-1, mixture=True):
    widths = check_multi_lora_slices(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights,
                                     max_rank)
    from ..triton.multi_lora import multi_lora_triton
    outs, col = [], 0
    for i, n in enumerate(widths):  # one shrink + expand pair per slice (launches on one stream, no sync)
        outs.append(multi_lora_triton(x, base[:, col: col + n].contiguous(), banks[8 * i: 8 * i + 8], tables[i],
                                      scales[i], group_a[i], group_b[i], segments, tokens, weights, max_rank,
                                      None if max_count < 0 else max_count, mixture))
        col += n
    return torch.cat(outs, 1)
