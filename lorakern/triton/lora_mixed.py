"""Triton kernels for compressed (LoRAQuant) adapters: lora_mixed and quant_matmul_lora.

* ``lora_shrink_kernel``: ``t[:, c0:c0+R] = x @ A^T`` for one part (high codes or
  1-bit signs), grid over M tiles; each K step dequantizes an ``[R, BLOCK_K]`` tile
  of A in registers and runs ``tl.dot`` into an fp32 ``[BLOCK_M, R]`` accumulator.
  Launched once per non-empty part; t stays fp32.
* ``lora_expand_kernel``: ``y = base + scale * (t_hi B_hi'^T + t_lo B_lo'^T)``, grid over
  (M tiles, N tiles); both parts' ``[R, BLOCK_N]`` tiles of B'^T are dequantized in
  registers (groups run along N, so BLOCK_N never straddles a group).
* quant_matmul_lora on CUDA: the base quant_matmul kernel, then the two above
  (3-4 launches in one op call; every weight is read once).

Bytes and FLOPs at M = 1, 4096 x 4096, rank 16 (h = 4 at 2 bits, 12 at 1 bit):
the adapter is 4 x 8192 x 2/8 + 12 x 8192 / 8 + scales = ~24 KB against the base's
8.4 MB at 4 bits, i.e. < 0.3 % more traffic; its launches are latency-bound
(~3 x 5 us on an H100), which is why a decode step should batch layers or use
CUDA graphs. Not timed here (no GPU was lent to this work).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import load_codes, load_weights
from .quant_matmul import launch_matmul

__all__ = ["lora_expand_kernel", "lora_mixed_triton", "lora_shrink_kernel", "quant_matmul_lora_triton",
           "shrink_block_k", "expand_block_n", "block_r", "block_m"]


@triton.jit
def lora_shrink_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, t_ptr, M, R, K, row_bytes, stride_xm, stride_tm, t_col0,
                       BITS: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    ng = K // G
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_rows + k0, mask=m_mask[:, None], other=0.0)
        w = load_weights(qw_ptr, s_ptr, z_ptr, offs_r, offs_r, tl.arange(0, BLOCK_K), k0, row_bytes, r_mask, ng,
                         BITS, G)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="tf32x3")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    t_ptrs = t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + t_col0 + offs_r[None, :]
    tl.store(t_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_part(t_ptr, qw_ptr, s_ptr, z_ptr, offs_m, m_mask, offs_n, N, R, row_bytes, stride_tm, t_col0,
                 BITS: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr):
    """``t[:, t_col0:t_col0+R] @ Bt`` for one part: [BLOCK_M, BLOCK_N] fp32."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    t = tl.load(t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + t_col0 + offs_r[None, :],
                mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    q = load_codes(qw_ptr, offs_r, offs_n, row_bytes, r_mask, BITS, G)
    ng = N // G
    sidx = offs_r[:, None] * ng + (offs_n // G)[None, :]
    s = tl.load(s_ptr + sidx, mask=r_mask[:, None], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sidx, mask=r_mask[:, None], other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - z) * s
    return tl.dot(t, w, input_precision="tf32x3")


@triton.jit
def lora_expand_kernel(t_ptr, base_ptr, y_ptr, qh_ptr, sh_ptr, zh_ptr, ql_ptr, sl_ptr, zl_ptr,
                       M, N, H, RL, rb_hi, rb_lo, stride_tm, stride_bm, stride_ym, scale,
                       BITS_HI: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_RH: tl.constexpr, BLOCK_RL: tl.constexpr, HAS_HI: tl.constexpr,
                       HAS_LO: tl.constexpr, HAS_BASE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N divides G, and G divides N: no column mask
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_HI:
        acc += _expand_part(t_ptr, qh_ptr, sh_ptr, zh_ptr, offs_m, m_mask, offs_n, N, H, rb_hi, stride_tm, 0,
                            BITS_HI, G, BLOCK_RH)
    if HAS_LO:
        acc += _expand_part(t_ptr, ql_ptr, sl_ptr, zl_ptr, offs_m, m_mask, offs_n, N, RL, rb_lo, stride_tm, H,
                            1, G, BLOCK_RL)
    acc = acc * scale
    if HAS_BASE:
        b = tl.load(base_ptr + offs_m[:, None].to(tl.int64) * stride_bm + offs_n[None, :], mask=m_mask[:, None],
                    other=0.0)
        acc += b.to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None])


def block_r(rows: int) -> int:
    """Register tile for ``rows`` adapter components (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(max(1, rows)))


def block_m(M: int, R: int = 16) -> int:
    """Token tile: 16 for decode, up to 64 (32 for ranks above 32: no register spills on sm_80)."""
    return 16 if M <= 16 else (32 if M <= 32 or R > 32 else 64)


def shrink_block_k(group_a: int) -> int:
    """K step of the shrink (divides every group size)."""
    return 32


def expand_block_n(group_b: int, R: int = 16) -> int:
    """N tile of the expand: divides the group of B'^T, hence N (32 for ranks above 32: no spills on sm_80)."""
    return min(64 if R <= 32 else 32, group_b)


def _shrink(x2, t, col0, q, s, z, bits, G):
    M, K = x2.shape
    R = q.shape[0]
    BM = block_m(M, R)
    lora_shrink_kernel[(triton.cdiv(M, BM),)](
        x2, q.contiguous(), s.contiguous(), z.contiguous(), t, M, R, K, q.shape[1], x2.stride(0), t.stride(0), col0,
        BITS=bits, G=G, BLOCK_M=BM, BLOCK_R=block_r(R), BLOCK_K=shrink_block_k(G), DOT_FP32=x2.dtype == torch.float32,
        num_warps=4)


def _lora_into(x2, base2, adapter, bits_hi, group_a, group_b, scale, y):
    """y = base2 + adapter(x2) (base2 may be None for zero). Arguments are assumed validated."""
    M, K = x2.shape
    N = y.shape[1]
    aq_h, as_h, az_h, bq_h, bs_h, bz_h, aq_l, as_l, az_l, bq_l, bs_l, bz_l = adapter
    H, RL = aq_h.shape[0], aq_l.shape[0]
    t = torch.empty((M, H + RL), dtype=torch.float32, device=x2.device)
    if H:
        _shrink(x2, t, 0, aq_h, as_h, az_h, bits_hi, group_a)
    if RL:
        _shrink(x2, t, H, aq_l, as_l, az_l, 1, group_a)
    BM, BN = block_m(M, H + RL), expand_block_n(group_b, H + RL)
    base_arg = base2 if base2 is not None else y
    lora_expand_kernel[(triton.cdiv(M, BM), N // BN)](
        t, base_arg, y, bq_h.contiguous(), bs_h.contiguous(), bz_h.contiguous(), bq_l.contiguous(), bs_l.contiguous(),
        bz_l.contiguous(), M, N, H, RL, bq_h.shape[1], bq_l.shape[1], t.stride(0), base_arg.stride(0), y.stride(0),
        float(scale), BITS_HI=bits_hi, G=group_b, BLOCK_M=BM, BLOCK_N=BN, BLOCK_RH=block_r(H), BLOCK_RL=block_r(RL),
        HAS_HI=H > 0, HAS_LO=RL > 0, HAS_BASE=base2 is not None, num_warps=4)
    return y


def lora_mixed_triton(x, base, adapter, bits_hi: int, group_a: int, group_b: int, scale: float):
    """``base + scale * (x A^T) B'^T`` on CUDA (arguments validated by lorakern.ops.schemas.check_lora_mixed)."""
    K, N = x.shape[-1], base.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    b2 = base.reshape(-1, N).contiguous()
    y = torch.empty_like(b2)
    if x2.shape[0] and N:
        _lora_into(x2, b2, adapter, bits_hi, group_a, group_b, scale, y)
    return y.view(base.shape)


def quant_matmul_lora_triton(x, qweight, scales, zeros, bits: int, group_size: int, bias, adapter, bits_hi: int,
                             group_a: int, group_b: int, scale: float):
    """The base quant_matmul, then the adapter added in place (validated by check_quant_matmul_lora)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    y = launch_matmul(x2, qweight, scales, zeros, bits, group_size, bias)
    if x2.shape[0] and y.shape[1]:
        _lora_into(x2, y, adapter, bits_hi, group_a, group_b, scale, y)  # each tile reads its base, then writes it
    return y.view(*x.shape[:-1], y.shape[1])
