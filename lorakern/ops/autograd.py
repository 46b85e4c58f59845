"""Derivatives of the ops, registered with ``torch.library.register_autograd``: training an adapter on a
quantized base (QLoRA-style, and QA-LoRA, arXiv 2309.14717) needs gradients to flow through the frozen
quantized layers to the activations below them.

=================  =====================================================================================
op                 gradient
=================  =====================================================================================
quant_matmul       ``dx = dy @ W`` (``quant_matmul_grad_input``: W dequantized in tiles, never whole),
                   ``dbias = sum(dy)``
gwq_matmul         ``dx = dy @ (W + S)`` (``gwq_matmul_grad_input``), ``dbias = sum(dy)``
=================  =====================================================================================

W is the exact dequantized weight: the CPU kernels' int8 rounding of the activations in the forward pass
is passed straight through. The packed weight, its scales, zeros and outliers get no gradient (the base is
frozen). The other ops are inference-only.
"""
from __future__ import annotations

import torch

__all__ = []


def _setup(ctx, inputs, output):
    x, qweight, scales, zeros, bits, group_size = inputs[:6]
    ctx.bits, ctx.group_size = bits, group_size
    ctx.outliers = len(inputs) >= 9  # gwq_matmul: row_ptr, col_idx, values (, bias)
    bias = inputs[9 if ctx.outliers else 6] if len(inputs) > (9 if ctx.outliers else 6) else None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(qweight, scales, zeros, *(inputs[6:9] if ctx.outliers else ()))


def _backward(ctx, grad):
    qweight, scales, zeros, *csr = ctx.saved_tensors
    nargs = len(ctx.needs_input_grad)  # the bias may be left to its default
    bias_index = 9 if ctx.outliers else 6
    grads = [None] * nargs
    if ctx.needs_input_grad[0]:
        if ctx.outliers:
            grads[0] = torch.ops.lorakern.gwq_matmul_grad_input(grad, qweight, scales, zeros, ctx.bits,
                                                                ctx.group_size, *csr)
        else:
            grads[0] = torch.ops.lorakern.quant_matmul_grad_input(grad, qweight, scales, zeros, ctx.bits,
                                                                  ctx.group_size)
    if nargs > bias_index and ctx.needs_input_grad[bias_index]:
        grads[bias_index] = grad.float().sum(tuple(range(grad.dim() - 1))).to(ctx.bias_dtype)
    return tuple(grads)


for _op in ("quant_matmul", "gwq_matmul"):
    torch.library.register_autograd(f"lorakern::{_op}", _backward, setup_context=_setup)
