"""Shared @triton.jit helpers: decoding the canonical packed layout in registers."""
import triton
import triton.language as tl


@triton.jit
def load_codes(qw_ptr, offs_n, offs_k, row_bytes, n_mask, BITS: tl.constexpr, G: tl.constexpr):
    """Integer codes [BLOCK_N, BLOCK_K] (int32) of rows offs_n at columns offs_k
    (docs/formats.md). Each code's byte is addressed directly; bytes shared by
    several codes are served from L1."""
    GB: tl.constexpr = G * BITS // 8
    g = offs_k // G
    i = offs_k % G
    base = qw_ptr + offs_n[:, None] * row_bytes + (g * GB)[None, :]
    mask = n_mask[:, None]
    if BITS == 8:
        q = tl.load(base + i[None, :], mask=mask, other=0).to(tl.int32)
    elif BITS == 1:  # one bit plane
        b = tl.load(base + (i // 8)[None, :], mask=mask, other=0).to(tl.int32)
        q = (b >> (i % 8)[None, :]) & 1
    elif BITS == 3:
        W2: tl.constexpr = G // 4
        lo = tl.load(base + (i % W2)[None, :], mask=mask, other=0).to(tl.int32)
        lo = (lo >> ((i // W2) * 2)[None, :]) & 3
        hi = tl.load(base + W2 + (i // 8)[None, :], mask=mask, other=0).to(tl.int32)
        hi = (hi >> (i % 8)[None, :]) & 1
        q = lo | (hi << 2)
    else:  # 2 or 4 bits, strided sub-byte packing
        W: tl.constexpr = G * BITS // 8
        b = tl.load(base + (i % W)[None, :], mask=mask, other=0).to(tl.int32)
        q = (b >> ((i // W) * BITS)[None, :]) & ((1 << BITS) - 1)
    return q


@triton.jit
def load_weights(qw_ptr, s_ptr, z_ptr, offs_n, offs_s, offs_k, k0, row_bytes, n_mask, ng, BITS: tl.constexpr,
                 G: tl.constexpr):
    """Dequantized fp32 weights ``s * (q - z)`` [BLOCK_N, BLOCK_K] of rows ``offs_n`` (codes at ``qw_ptr``,
    scales / zeros of rows ``offs_s``, ``ng`` groups per row) at columns ``k0 + offs_k`` (one group)."""
    q = load_codes(qw_ptr, offs_n, k0 + offs_k, row_bytes, n_mask, BITS, G)
    g = k0 // G
    s = tl.load(s_ptr + offs_s * ng + g, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_s * ng + g, mask=n_mask, other=0.0).to(tl.float32)
    return (q.to(tl.float32) - z[:, None]) * s[:, None]
