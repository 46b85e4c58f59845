"""Triton kernels for quant_matmul and dequantize (CUDA tensors; CPU tensors
under TRITON_INTERPRET=1 for testing).

quant_matmul: grid over (M tiles, N tiles); each K step loads an activation
tile and the packed codes of a weight tile, dequantizes them in registers
(never to memory) and accumulates ``x @ w^T`` with ``tl.dot`` in fp32. A K tile
never straddles a group (BLOCK_K divides every group size), so each step needs
one scale and one zero per output column. Tile configs are data
(:data:`CONFIGS`), picked by M; no autotuning on the hot path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import load_codes, load_weights

__all__ = ["CONFIGS", "pick_config", "launch_matmul", "qalora_block_r", "quant_matmul_qalora_triton",
           "quant_matmul_triton", "dequantize_triton",
           "quant_matmul_kernel", "dequantize_kernel"]

# name -> launch parameters (BLOCK_K = 32 divides every group size). Chosen so that no
# config spills registers on sm_80/sm_90 (python -m lorakern.triton.aot).
CONFIGS = {
    "decode": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3),    # M <= 16
    "small": dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),     # M <= 32
    "medium": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),    # M <= 64
    "large": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),    # M > 64
}


BLOCK_K = 32
DEQUANT_BLOCK_N = 32


def pick_config(M: int) -> str:
    """Tile config name for M rows of activations."""
    if M <= 16:
        return "decode"
    if M <= 32:
        return "small"
    if M <= 64:
        return "medium"
    return "large"


@triton.jit
def quant_matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, rp_ptr, col_ptr, val_ptr, nnz,
                        a_ptr, bt_ptr, rank, qa_scale,
                        M, N, K, row_bytes, stride_xm, stride_ym,
                        HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_FP32: tl.constexpr, HAS_QALORA: tl.constexpr = False, BLOCK_R: tl.constexpr = 16):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    ng = K // G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    qw_rows = qw_ptr + (pid_n * BLOCK_N).to(tl.int64) * row_bytes  # 64-bit offset once per tile
    offs_nl = tl.arange(0, BLOCK_N)
    if HAS_QALORA:  # QA-LoRA: t = pool_G(x) A^T accumulated from the same activation tiles
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_rows + k0, mask=m_mask[:, None], other=0.0)
        if HAS_QALORA:  # this tile's part of its group's sum, times the group's column of A
            a_g = tl.load(a_ptr + offs_r * ng + k0 // G, mask=r_mask, other=0.0).to(tl.float32)
            t += tl.sum(x.to(tl.float32), axis=1)[:, None] * a_g[None, :]
        w = load_weights(qw_rows, s_ptr, z_ptr, offs_nl, offs_n, tl.arange(0, BLOCK_K), k0, row_bytes, n_mask, ng,
                         BITS, G)
        if DOT_FP32:  # fp32 activations: 3xTF32 on tensor cores, about fp32 accuracy
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="tf32x3")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_OUTLIERS:
        # gwq_matmul: each column's CSR outliers into the same accumulator, one
        # outlier per column per step, against the unquantized activations. Every
        # index is masked, so a damaged CSR never reads out of bounds.
        r0 = tl.load(rp_ptr + offs_n, mask=n_mask, other=0)
        r1 = tl.load(rp_ptr + offs_n + 1, mask=n_mask, other=0)
        cnt = tl.where(n_mask & (r1 > r0), r1 - r0, 0)
        for j in range(0, tl.max(cnt, 0)):
            idx = r0 + j
            live = (j < cnt) & (idx >= 0) & (idx < nnz)
            c = tl.load(col_ptr + idx, mask=live, other=0).to(tl.int32)
            v = tl.load(val_ptr + idx, mask=live, other=0.0).to(tl.float32)
            live = live & (c < K)
            xg = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + c[None, :],
                         mask=m_mask[:, None] & live[None, :], other=0.0)
            acc += xg.to(tl.float32) * v[None, :]
    if HAS_QALORA:  # acc += (scale / G) * t @ B^T[:, offs_n]
        bt = tl.load(bt_ptr + offs_r[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(t * (qa_scale / G), bt, input_precision="tf32x3")
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def dequantize_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, row_bytes,
                      BITS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = g * G + tl.arange(0, G)
    q = load_codes(qw_ptr, offs_n.to(tl.int64), offs_k, row_bytes, n_mask, BITS, G)
    ng = K // G
    s = tl.load(s_ptr + offs_n * ng + g, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n * ng + g, mask=n_mask, other=0.0).to(tl.float32)
    out = out_ptr + offs_n[:, None].to(tl.int64) * K + g * G + tl.arange(0, G)[None, :]
    tl.store(out, (q.to(tl.float32) - z[:, None]) * s[:, None], mask=n_mask[:, None])


def launch_matmul(x, qweight, scales, zeros, bits: int, group_size: int, bias=None, outliers=None,
                  config: str | None = None, qalora=None):
    """Launch quant_matmul_kernel; ``outliers = (row_ptr, col_idx, values)`` adds
    the CSR outliers (gwq_matmul), ``qalora = (A, Bt, scale)`` an unmerged QA-LoRA adapter.
    Arguments are assumed validated."""
    N = qweight.shape[0]
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.view(*x.shape[:-1], N)
    name = config or pick_config(M)
    if qalora is not None and name == "large" and qalora_block_r(qalora[0].shape[0]) > 16:
        name = "medium"  # a [128, R > 16] fp32 accumulator for t spills registers
    cfg = dict(CONFIGS[name])
    BM, BN = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    b = bias.to(torch.float32).contiguous() if bias is not None else y  # dummy pointer when absent
    if outliers is not None:
        rp, ci, v = (t.contiguous() for t in outliers)
        nnz = v.shape[0]
    else:
        rp, ci, v, nnz = y, y, y, 0  # dummies, never read
    if qalora is not None:
        A, Bt, qscale = qalora
        A, Bt = A.to(torch.float32).contiguous(), Bt.to(torch.float32).contiguous()
        rank, BR = A.shape[0], qalora_block_r(A.shape[0])
    else:
        A, Bt, rank, qscale, BR = y, y, 0, 0.0, 16  # dummies, never read
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    quant_matmul_kernel[grid](
        x2, qweight.contiguous(), scales.contiguous(), zeros.contiguous(), b, y, rp, ci, v, nnz, A, Bt, rank,
        float(qscale), M, N, K, qweight.shape[1], x2.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        HAS_OUTLIERS=outliers is not None, BITS=bits, G=group_size, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BLOCK_K,
        DOT_FP32=x.dtype == torch.float32, HAS_QALORA=qalora is not None, BLOCK_R=BR, **cfg)
    return y.view(*x.shape[:-1], N)


def qalora_block_r(rank: int) -> int:
    """The padded rank of a QA-LoRA adapter in the fused kernel: a power of two, at least 16 (``tl.dot``)."""
    return max(16, triton.next_power_of_2(rank))


def quant_matmul_qalora_triton(x, qweight, scales, zeros, bits: int, group_size: int, bias, A, Bt, scale: float,
                               config: str | None = None):
    """Launch quant_matmul with an unmerged QA-LoRA adapter: the pooled shrink accumulated from the activation
    tiles of the K loop, the expand one ``tl.dot`` in the epilogue. Arguments are assumed validated
    (lorakern.ops.schemas.check_quant_matmul_qalora)."""
    return launch_matmul(x, qweight, scales, zeros, bits, group_size, bias, None, config, (A, Bt, scale))


def quant_matmul_triton(x, qweight, scales, zeros, bits: int, group_size: int, bias=None,
                        config: str | None = None):
    """Launch the Triton quant_matmul. Arguments are assumed validated
    (lorakern.ops.schemas.check_quant_matmul)."""
    return launch_matmul(x, qweight, scales, zeros, bits, group_size, bias, None, config)


def dequantize_triton(qweight, scales, zeros, bits: int, group_size: int):
    """Launch the Triton dequantize: fp32 [N, K]."""
    N = qweight.shape[0]
    K = qweight.shape[1] * 8 // bits
    out = torch.empty((N, K), dtype=torch.float32, device=qweight.device)
    BN = DEQUANT_BLOCK_N
    if N:
        grid = (triton.cdiv(N, BN), K // group_size)
        dequantize_kernel[grid](qweight.contiguous(), scales.contiguous(), zeros.contiguous(), out, N, K,
                                qweight.shape[1], BITS=bits, G=group_size, BLOCK_N=BN)
    return out
