"""Canonical bit packing of group-wise integer codes (docs/formats.md).

Codes of a weight ``[N, K]`` are packed row by row, group by group (``G`` codes
along K), each group into ``G * bits / 8`` bytes:

* ``bits`` in {2, 4, 8}: ``P = 8 // bits`` codes per byte, ``W = G // P``; byte
  ``j`` of the group holds code ``s * W + j`` in bits ``[s*bits, (s+1)*bits)``.
  Unpacking a shift ``s`` gives ``W`` *consecutive* codes, so SIMD kernels need
  one shift and one mask per vector and no shuffles.
* ``bits == 3``: the low two bits as a 2-bit group (``G/4`` bytes), then bit 2
  as one bit plane (``G/8`` bytes, bit ``i % 8`` of byte ``i // 8`` is code ``i``).
* ``bits == 1``: one bit plane (sign weights: ``w = s * sign(w)`` is stored as
  code ``q = (w >= 0)`` with scale ``2s`` and zero ``0.5``).
"""
from __future__ import annotations

import torch

__all__ = ["SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES", "pack_codes", "unpack_codes", "packed_row_bytes"]

SUPPORTED_BITS = (1, 2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def packed_row_bytes(K: int, bits: int) -> int:
    """Bytes of one packed row of ``K`` codes."""
    return K * bits // 8


def _check(bits: int, group_size: int, K: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if K % group_size != 0:
        raise ValueError(f"K={K} is not a multiple of group_size={group_size}")


def _pack_strided(q: torch.Tensor, bits: int) -> torch.Tensor:
    # q: [N, ng, G] -> [N, ng, G*bits/8]
    N, ng, G = q.shape
    P = 8 // bits
    q = q.reshape(N, ng, P, G // P).to(torch.int32)
    shifts = (torch.arange(P, dtype=torch.int32, device=q.device) * bits).view(1, 1, P, 1)
    return (q << shifts).sum(dim=2).to(torch.uint8)


def _unpack_strided(p: torch.Tensor, bits: int) -> torch.Tensor:
    # p: [N, ng, W] -> [N, ng, W*P]
    N, ng, W = p.shape
    P = 8 // bits
    shifts = (torch.arange(P, dtype=torch.int32, device=p.device) * bits).view(1, 1, P, 1)
    q = (p.to(torch.int32).unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    return q.reshape(N, ng, P * W).to(torch.uint8)


def _pack_plane(bit: torch.Tensor) -> torch.Tensor:
    # bit: [N, ng, G] of 0/1 -> [N, ng, G/8]
    N, ng, G = bit.shape
    w = (1 << torch.arange(8, dtype=torch.int32, device=bit.device)).view(1, 1, 1, 8)
    return (bit.reshape(N, ng, G // 8, 8).to(torch.int32) * w).sum(-1).to(torch.uint8)


def _unpack_plane(p: torch.Tensor) -> torch.Tensor:
    N, ng, B = p.shape
    sh = torch.arange(8, dtype=torch.int32, device=p.device).view(1, 1, 1, 8)
    return ((p.to(torch.int32).unsqueeze(-1) >> sh) & 1).reshape(N, ng, B * 8).to(torch.uint8)


def pack_codes(q: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Pack integer codes ``q`` ([N, K], values in [0, 2**bits)) into uint8 [N, K*bits/8]."""
    if q.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(q.shape)}")
    N, K = q.shape
    _check(bits, group_size, K)
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    g = q.reshape(N, K // group_size, group_size)
    if bits == 8:
        out = g.to(torch.uint8)
    elif bits in (2, 4):
        out = _pack_strided(g, bits)
    elif bits == 3:
        out = torch.cat([_pack_strided(g & 3, 2), _pack_plane((g >> 2) & 1)], dim=-1)
    else:  # 1
        out = _pack_plane(g)
    return out.reshape(N, packed_row_bytes(K, bits)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, group_size: int, K: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [N, K*bits/8] -> uint8 codes [N, K]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError("packed codes must be a 2-D uint8 tensor")
    N, rb = packed.shape
    if (rb * 8) % bits:
        raise ValueError(f"{rb} bytes per row do not hold a whole number of {bits}-bit codes")
    K = rb * 8 // bits if K is None else K
    _check(bits, group_size, K)
    if packed_row_bytes(K, bits) != rb:
        raise ValueError(f"expected {packed_row_bytes(K, bits)} bytes per row for K={K}, got {rb}")
    ng = K // group_size
    gb = group_size * bits // 8
    p = packed.reshape(N, ng, gb)
    if bits == 8:
        out = p
    elif bits in (2, 4):
        out = _unpack_strided(p, bits)
    elif bits == 3:
        w = group_size // 4
        out = _unpack_strided(p[..., :w], 2) | (_unpack_plane(p[..., w:]) << 2)
    else:
        out = _unpack_plane(p)
    return out.reshape(N, K)
