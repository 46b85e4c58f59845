"""Triton quant_matmul_grad_input / gwq_matmul_grad_input: ``dx = dy @ W`` (CUDA tensors; CPU tensors under
TRITON_INTERPRET=1 for testing), the gradient of quant_matmul with respect to its input.

Grid over (M tiles, K tiles of BLOCK_K = 32 columns, one quantization group's slice); each N step loads a
gradient tile ``[BLOCK_M, BLOCK_N]`` and the packed codes of ``W[n0 : n0 + BLOCK_N, k0 : k0 + 32]``,
dequantizes them in registers (the same decoder as the forward kernel) and accumulates with ``tl.dot`` in
fp32. gwq_matmul's outliers add ``dy[:, row] * value`` into ``dx[:, col]`` with one ``index_add_`` of
torch (no host synchronisation; every index of a damaged CSR is clamped and its entry masked, so it never
reads or writes out of bounds).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import load_weights

__all__ = ["CONFIGS", "grad_input_kernel", "grad_input_triton", "pick_config"]

BLOCK_K = 32
#: the outliers' [rows of dy, nnz] fp32 temporary is kept under this many elements (256 MiB)
OUTLIER_CHUNK_ELEMENTS = 1 << 26
# name -> launch parameters, picked by M (rows of the gradient)
CONFIGS = {
    "small": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3),   # M <= 16
    "medium": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),  # M <= 64
    "large": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),  # M > 64
}


def pick_config(M: int) -> str:
    """Tile config name for M rows of the gradient."""
    return "small" if M <= 16 else ("medium" if M <= 64 else "large")


@triton.jit
def grad_input_kernel(g_ptr, qw_ptr, s_ptr, z_ptr, dx_ptr, M, N, K, row_bytes, stride_gm, stride_dm,
                      BITS: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    k0 = pid_k * BLOCK_K
    ng = K // G
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    g_rows = g_ptr + offs_m[:, None].to(tl.int64) * stride_gm
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        g = tl.load(g_rows + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = load_weights(qw_ptr, s_ptr, z_ptr, offs_n.to(tl.int64), offs_n, tl.arange(0, BLOCK_K), k0, row_bytes,
                         n_mask, ng, BITS, G)
        if DOT_FP32:
            acc += tl.dot(g.to(tl.float32), w, input_precision="tf32x3")
        else:
            acc += tl.dot(g, w.to(g.dtype))
    out = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dm + k0 + tl.arange(0, BLOCK_K)[None, :]
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None])


def grad_input_triton(grad, qweight, scales, zeros, bits: int, group_size: int, outliers=None,
                      config: str | None = None):
    """Launch the Triton gradient ``grad [..., N] @ (W + S)``; ``outliers = (row_ptr, col_idx, values)``.
    Arguments are assumed validated (lorakern.ops.schemas.check_grad_input)."""
    N = qweight.shape[0]
    K = qweight.shape[1] * 8 // bits
    if grad.numel() == 0:
        return torch.zeros((*grad.shape[:-1], K), dtype=grad.dtype, device=grad.device)
    g2 = grad.reshape(-1, N).contiguous()
    M = g2.shape[0]
    cfg = dict(CONFIGS[config or pick_config(M)])
    BM, BN = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    dense_dtype = grad.dtype if outliers is None else torch.float32
    dx = torch.empty((M, K), dtype=dense_dtype, device=grad.device)
    grid = (triton.cdiv(M, BM), K // BLOCK_K)
    grad_input_kernel[grid](g2, qweight.contiguous(), scales.contiguous(), zeros.contiguous(), dx, M, N, K,
                            qweight.shape[1], g2.stride(0), dx.stride(0), BITS=bits, G=group_size, BLOCK_M=BM,
                            BLOCK_N=BN, BLOCK_K=BLOCK_K, DOT_FP32=grad.dtype == torch.float32, **cfg)
    if outliers is not None:
        row_ptr, col_idx, values = outliers
        nnz = values.shape[0]
        j = torch.arange(nnz, device=grad.device, dtype=row_ptr.dtype)
        rows = torch.searchsorted(row_ptr[1:].contiguous(), j, right=True).clamp_(max=N - 1)  # entry j's row
        cols = col_idx.long()
        live = (cols < K).float()  # a damaged CSR is masked, never indexed out of bounds
        vals, cols = values.float() * live, cols.clamp(max=K - 1)
        step = max(1, OUTLIER_CHUNK_ELEMENTS // max(1, nnz))  # rows of dy per [rows, nnz] temporary
        for m0 in range(0, M, step):
            dx[m0:m0 + step].index_add_(1, cols, g2[m0:m0 + step, rows].float() * vals)
        dx = dx.to(grad.dtype)
    return dx.view(*grad.shape[:-1], K)
