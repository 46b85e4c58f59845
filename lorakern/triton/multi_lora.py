"""Triton kernels for batched multi-adapter LoRA over a layer's adapter bank (lorakern.multilora).

The batch (LoRABatch) lists entries (token, weight) grouped by adapter into segments. Both kernels
run a grid over (segments, entry tiles of the segment[, N tiles]); a program whose tile lies past
its segment's end returns at once, so the grid is sized by the largest segment (known on the host
when the batch is built: no synchronisation inside the layer loop).

* ``multi_shrink_kernel``: ``t[e, :r] = w_e * scale * x[token_e] A^T``. Each K step loads the
  gathered activation rows and an ``[R, BLOCK_K]`` tile of the adapter's A: dense rows straight
  from the slab, or compressed rows decoded in registers (the high rows at the slot's bits, the
  low rows as 1-bit planes; the bits are a per-row value, so one launch serves 2/3/4/8-bit slots
  and dense ones alike). ``SPLIT_K`` > 1 splits K across programs (few tokens, large K) and adds
  the partial products atomically.
* ``multi_expand_kernel``: ``y[token_e] += t[e, :r] B^T`` per ``[BLOCK_M, BLOCK_N]`` tile, B^T's
  rows decoded the same way. With one adapter per token the tile is read, added and written in
  y's dtype; with mixtures (a token in several segments) into an fp32 buffer with atomic adds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.bank import TABLE_COLUMNS, SlotKind

# the slot table's record (lorakern.formats.bank.SlotRow; lk_slot_column in C), named for the kernels
NUM_COLUMNS = tl.constexpr(len(TABLE_COLUMNS))
COL_KIND = tl.constexpr(TABLE_COLUMNS.index("kind"))
COL_RANK = tl.constexpr(TABLE_COLUMNS.index("rank"))
COL_ROW = tl.constexpr(TABLE_COLUMNS.index("row"))
COL_H = tl.constexpr(TABLE_COLUMNS.index("h"))
COL_BITS_HI = tl.constexpr(TABLE_COLUMNS.index("bits_hi"))
COL_A_OFF = tl.constexpr(TABLE_COLUMNS.index("a_off"))
COL_B_OFF = tl.constexpr(TABLE_COLUMNS.index("b_off"))
KIND_DENSE = tl.constexpr(int(SlotKind.DENSE))
KIND_COMPRESSED = tl.constexpr(int(SlotKind.COMPRESSED))

__all__ = ["multi_expand_kernel", "multi_shrink_kernel", "lora_shrink_triton", "lora_expand_triton",
           "multi_lora_triton", "expand_block_n", "shrink_block_k", "split_k"]


@triton.jit
def _decode_rows(q_ptr, row_base, row_bits, offs_k, rk_mask, G: tl.constexpr):
    """Codes [R, BLOCK_K] (fp32) of rows starting at byte offsets ``row_base`` [R] with ``row_bits`` [R]
    bits each (1, 2, 3, 4 or 8), columns ``offs_k`` (docs/formats.md's layouts)."""
    b = row_bits[:, None]
    g = (offs_k // G)[None, :]
    i = (offs_k % G)[None, :]
    gbase = row_base[:, None] + g * (G * b // 8)
    is1 = b == 1
    is3 = b == 3
    bb = tl.where(is3, 2, b)  # bits of the strided part (3-bit: its low two bits)
    W = G * bb // 8
    byte = tl.where(is1, i // 8, i % W)
    sh = tl.where(is1, i % 8, (i // W) * bb)
    v = tl.load(q_ptr + gbase + byte, mask=rk_mask, other=0).to(tl.int32)
    q = (v >> sh) & ((1 << bb) - 1)
    hi = tl.load(q_ptr + gbase + G // 4 + i // 8, mask=rk_mask & is3, other=0).to(tl.int32)
    q = q | (((hi >> (i % 8)) & 1) << 2)
    return q.to(tl.float32)


@triton.jit
def _slot(seg_ptr, table_ptr, s, num_slots, E, drows, qrows, q_bytes, cols, IS_A: tl.constexpr):
    """The segment's slot and table row. Memory-safe whatever the tensors hold: a slot outside the table,
    an empty (removed) slot or offsets outside the slabs act as rank 0, and the entries are clipped to
    [0, E). (The host builds valid batches; lorakern.multilora checks them, and the CPU path raises.)"""
    slot = tl.load(seg_ptr + 3 * s)
    start = tl.load(seg_ptr + 3 * s + 1)
    count = tl.load(seg_ptr + 3 * s + 2)
    slot_ok = (slot >= 0) & (slot < num_slots)
    slot = tl.where(slot_ok, slot, 0)
    t = table_ptr + slot * NUM_COLUMNS
    kind = tl.load(t + COL_KIND)
    rank = tl.load(t + COL_RANK)
    row = tl.load(t + COL_ROW)
    h = tl.load(t + COL_H)
    bits = tl.load(t + COL_BITS_HI)
    aoff = tl.load(t + COL_A_OFF)
    boff = tl.load(t + COL_B_OFF)
    dense_ok = (kind == KIND_DENSE) & (row >= 0) & (rank >= 0) & (row + rank <= drows)
    if IS_A:
        off = aoff
    else:
        off = boff
    rl = rank - h
    nbytes = h * (cols * bits // 8) + rl * (cols // 8)
    q_ok = (kind == KIND_COMPRESSED) & (row >= 0) & (h >= 0) & (rl >= 0) & (row + rank <= qrows) & (off >= 0) & \
        ((bits == 2) | (bits == 3) | (bits == 4) | (bits == 8)) & (off + nbytes <= q_bytes)
    rank = tl.where(slot_ok & (dense_ok | q_ok), rank, 0)
    start = tl.maximum(tl.minimum(start, E), 0)
    count = tl.maximum(tl.minimum(count, E - start), 0)
    return slot, start, count, kind, rank, row, h, bits, aoff, boff


@triton.jit
def _weight_rows(offs_r, rank, h, bits, off, cols):
    """Per row of a compressed factor: its bits and its first byte (high rows, then 1-bit rows)."""
    hi = offs_r < h
    row_bits = tl.where(hi, bits, 1)
    rb_hi = cols * bits // 8
    row_base = tl.where(hi, off + offs_r * rb_hi, off + h * rb_hi + (offs_r - h) * (cols // 8))
    return row_bits, row_base.to(tl.int64)


@triton.jit
def _entries(tok_ptr, start, count, pid_m, T, rank, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """The program's tile of the segment's entries: their indices, tokens and mask, and the rank columns."""
    offs_e = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = tl.load(tok_ptr + offs_e, mask=offs_e < start + count, other=0).to(tl.int64)
    e_mask = (offs_e < start + count) & (tok >= 0) & (tok < T)
    offs_r = tl.arange(0, BLOCK_R)
    return offs_e, tok, e_mask, offs_r, offs_r < rank


@triton.jit
def multi_shrink_kernel(x_ptr, tok_ptr, w_ptr, seg_ptr, table_ptr, scales_ptr, da_ptr, qa_ptr, qas_ptr, qaz_ptr,
                        t_ptr, T, K, stride_xm, ldt, nga, k_per_split, num_slots, E, drows, qrows, qa_bytes,
                        GA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_FP32: tl.constexpr, SPLIT_K: tl.constexpr):
    s = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot, start, count, kind, rank, row, h, bits, aoff, boff = _slot(seg_ptr, table_ptr, s, num_slots, E, drows,
                                                                     qrows, qa_bytes, K, True)
    if pid_m * BLOCK_M < count:
        offs_e, tok, e_mask, offs_r, r_mask = _entries(tok_ptr, start, count, pid_m, T, rank, BLOCK_M, BLOCK_R)
        row_bits, row_base = _weight_rows(offs_r, rank, h, bits, aoff, K)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        k_lo = pid_k * k_per_split
        for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + tok[:, None] * stride_xm + offs_k[None, :], mask=e_mask[:, None] & k_mask[None, :],
                        other=0.0)
            rk = r_mask[:, None] & k_mask[None, :]
            if kind == KIND_DENSE:
                a = tl.load(da_ptr + (row + offs_r)[:, None].to(tl.int64) * K + offs_k[None, :], mask=rk,
                            other=0.0).to(tl.float32)
            else:
                q = _decode_rows(qa_ptr, row_base, row_bits, offs_k, rk, GA)
                sidx = (row + offs_r).to(tl.int64) * nga + k0 // GA
                sc = tl.load(qas_ptr + sidx, mask=r_mask, other=0.0).to(tl.float32)
                zp = tl.load(qaz_ptr + sidx, mask=r_mask, other=0.0).to(tl.float32)
                a = (q - zp[:, None]) * sc[:, None]
            if DOT_FP32:
                acc += tl.dot(x.to(tl.float32), tl.trans(a), input_precision="tf32x3")
            else:
                acc += tl.dot(x, tl.trans(a.to(x.dtype)))
        coef = tl.load(w_ptr + offs_e, mask=e_mask, other=0.0) * tl.load(scales_ptr + slot)
        acc = acc * coef[:, None]
        t_ptrs = t_ptr + offs_e[:, None].to(tl.int64) * ldt + offs_r[None, :]
        if SPLIT_K == 1:
            tl.store(t_ptrs, acc, mask=e_mask[:, None] & r_mask[None, :])
        else:
            tl.atomic_add(t_ptrs, acc, mask=e_mask[:, None] & r_mask[None, :])


@triton.jit
def multi_expand_kernel(t_ptr, tok_ptr, seg_ptr, table_ptr, db_ptr, qb_ptr, qbs_ptr, qbz_ptr, y_ptr,
                        T, N, ldt, stride_ym, ngb, num_slots, E, drows, qrows, qb_bytes,
                        GB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        ATOMIC: tl.constexpr):
    s = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot, start, count, kind, rank, row, h, bits, aoff, boff = _slot(seg_ptr, table_ptr, s, num_slots, E, drows,
                                                                     qrows, qb_bytes, N, False)
    if pid_m * BLOCK_M < count:
        offs_e, tok, e_mask, offs_r, r_mask = _entries(tok_ptr, start, count, pid_m, T, rank, BLOCK_M, BLOCK_R)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        t = tl.load(t_ptr + offs_e[:, None].to(tl.int64) * ldt + offs_r[None, :],
                    mask=e_mask[:, None] & r_mask[None, :], other=0.0)
        rn = r_mask[:, None] & n_mask[None, :]
        if kind == KIND_DENSE:
            bt = tl.load(db_ptr + (row + offs_r)[:, None].to(tl.int64) * N + offs_n[None, :], mask=rn,
                         other=0.0).to(tl.float32)
        else:
            row_bits, row_base = _weight_rows(offs_r, rank, h, bits, boff, N)
            q = _decode_rows(qb_ptr, row_base, row_bits, offs_n, rn, GB)
            sidx = (row + offs_r)[:, None].to(tl.int64) * ngb + (offs_n // GB)[None, :]
            sc = tl.load(qbs_ptr + sidx, mask=rn, other=0.0).to(tl.float32)
            zp = tl.load(qbz_ptr + sidx, mask=rn, other=0.0).to(tl.float32)
            bt = (q - zp) * sc
        acc = tl.dot(t, bt, input_precision="tf32x3")
        y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :]
        mask = e_mask[:, None] & n_mask[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptrs, acc, mask=mask)
        else:
            y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(max(1, r)))


def _block_m(count: int, R: int) -> int:
    return 16 if count <= 16 else (32 if count <= 32 or R > 32 else 64)


def shrink_block_m(count: int, BR: int) -> int:
    """Entry tile of the shrink: as _block_m, but 16 for rank tiles above 32 (no spills on sm_80)."""
    return 16 if BR > 32 else _block_m(count, BR)


def shrink_block_k(BR: int) -> int:
    """K step of the shrink: 32, 16 for rank tiles above 32 (the per-row decode would spill on sm_80/90)."""
    return 32 if BR <= 32 else 16


def expand_block_n(BR: int, G: int) -> int:
    """N tile of the expand (divides B^T's group): 64, 16 for rank tiles above 32 (no spills)."""
    return min(64 if BR <= 32 else 16, G)


def split_k(max_count: int, K: int) -> int:
    """K splits of the shrink: 4 when every segment has at most 16 entries and K >= 2048 (decode with many
    adapters: otherwise a few programs would each stream a whole [r, K] A)."""
    return 4 if max_count <= 16 and K >= 2048 else 1


def _bank_ptrs(bank):
    return [b if b.is_contiguous() else b.contiguous() for b in bank]


def lora_shrink_triton(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank: int,
                       max_count: int | None = None):
    """t [E, max_rank] fp32 (arguments validated by check_lora_shrink; max_count: the largest segment,
    read from the segments if not given -- one device-to-host copy)."""
    da, _, qa, qas, qaz, _, _, _ = _bank_ptrs(bank)
    T, K = x.shape
    E, nseg = tokens.shape[0], segments.shape[0]
    x = x.contiguous()
    ldt = max(max_rank, 1)
    t = torch.zeros((E, ldt), dtype=torch.float32, device=x.device)
    if nseg == 0 or E == 0:
        return t[:, :max_rank]
    if max_count is None:
        max_count = int(segments[:, 2].max())
    BR = _block_r(max_rank)
    BM = shrink_block_m(max_count, BR)
    SK = split_k(max_count, K)
    BK = shrink_block_k(BR)
    k_per = triton.cdiv(triton.cdiv(K, SK), BK) * BK
    SK = triton.cdiv(K, k_per)
    ga = group_a or 32
    multi_shrink_kernel[(nseg, triton.cdiv(max_count, BM), SK)](
        x, tokens, weights, segments, table, scales, da, qa, qas, qaz, t, T, K, x.stride(0), ldt,
        qas.shape[1], k_per, table.shape[0], E, da.shape[0], qas.shape[0], qa.numel(), GA=ga, BLOCK_M=BM, BLOCK_R=BR, BLOCK_K=BK,
        DOT_FP32=x.dtype == torch.float32 or da.dtype == torch.float32, SPLIT_K=SK, num_warps=4)
    return t[:, :max_rank]


def lora_expand_triton(t, base, bank, table, scales, group_a, group_b, segments, tokens,
                       max_count: int | None = None, mixture: bool | None = None):
    """base + the expand (validated by check_lora_expand). ``mixture``: whether a token may appear in
    several segments (atomic adds into fp32); found from the tokens if not given."""
    _, db, _, _, _, qb, qbs, qbz = _bank_ptrs(bank)
    T, N = base.shape
    nseg = segments.shape[0]
    if nseg == 0 or tokens.shape[0] == 0 or N == 0:
        return base.clone()
    if max_count is None:
        max_count = int(segments[:, 2].max())
    if mixture is None:
        mixture = bool(torch.unique(tokens).numel() < tokens.numel())
    t = t.contiguous()
    y = base.float().clone() if mixture else base.clone()
    BR = _block_r(t.shape[1])
    BM = _block_m(max_count, BR)
    gb = group_b or 32
    BN = expand_block_n(BR, gb)
    multi_expand_kernel[(nseg, triton.cdiv(max_count, BM), triton.cdiv(N, BN))](
        t, tokens, segments, table, db, qb, qbs, qbz, y, T, N, t.stride(0), y.stride(0), qbs.shape[1],
        table.shape[0], tokens.shape[0], db.shape[0], qbs.shape[0], qb.numel(), GB=gb, BLOCK_M=BM, BLOCK_R=BR, BLOCK_N=BN, ATOMIC=mixture, num_warps=4)
    return y.to(base.dtype) if mixture else y


def multi_lora_triton(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank: int,
                      max_count: int | None = None, mixture: bool | None = None):
    """lora_shrink_triton then lora_expand_triton (two launches)."""
    t = lora_shrink_triton(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, max_count)
    return lora_expand_triton(t, base, bank, table, scales, group_a, group_b, segments, tokens, max_count, mixture)
