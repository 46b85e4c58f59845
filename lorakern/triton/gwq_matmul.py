"""Triton gwq_matmul: quant_matmul_kernel with its outlier epilogue
(HAS_OUTLIERS): after the dense K loop, each output column adds its CSR
outliers times the unquantized activations into the same fp32 accumulator."""
from __future__ import annotations

from .quant_matmul import launch_matmul

__all__ = ["gwq_matmul_triton"]


def gwq_matmul_triton(x, qweight, scales, zeros, bits: int, group_size: int, row_ptr, col_idx, values, bias=None,
                      config: str | None = None):
    """Launch the Triton gwq_matmul. Arguments are assumed validated
    (lorakern.ops.schemas.check_gwq_matmul); damaged CSR entries are masked, never read out of bounds."""
    return launch_matmul(x, qweight, scales, zeros, bits, group_size, bias, (row_ptr, col_idx, values), config)
