"""Plain-torch reference implementations: the ground truth for tests, and the
default backend for any device without its own kernels."""
from __future__ import annotations

import torch

from ..formats.packing import unpack_codes
from ..formats.outliers import SparseOutliers
from .schemas import (check_multi_lora_slices, check_gwq_matmul, check_lora_expand, check_lora_mixed, check_lora_shrink, check_multi_lora, check_quant_matmul, check_quant_matmul_lora, check_qweight,
                      lib)

__all__ = ["multi_lora_slices", "multi_lora_slices_int8_act", "bank_factors", "lora_expand", "lora_shrink", "lora_shrink_int8_act", "multi_lora", "multi_lora_int8_act",
           "act_block", "dequantize", "gwq_matmul", "gwq_matmul_int8_act", "lora_delta", "lora_mixed",
           "lora_mixed_int8_act", "outliers_dense", "quant_matmul", "quant_matmul_int8_act", "quant_matmul_lora",
           "quant_matmul_lora_int8_act", "quantize_activations_int8"]


def dequantize(qweight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """fp32 [N, K] = scales * (codes - zeros), group-wise."""
    N, K = check_qweight(qweight, scales, zeros, bits, group_size)
    q = unpack_codes(qweight, bits, group_size, K).to(torch.float32).view(N, K // group_size, group_size)
    w = scales.float().unsqueeze(-1) * (q - zeros.float().unsqueeze(-1))
    return w.view(N, K)


def quant_matmul(x, qweight, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """x @ dequantize(W)^T (+ bias) in fp32, cast to x.dtype."""
    check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    w = dequantize(qweight, scales, zeros, bits, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def act_block(group_size: int) -> int:
    """Activation quantization block of the CPU kernels: 64, or the group if smaller."""
    return min(group_size, 64)


def quantize_activations_int8(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The CPU kernels' activation quantization, dequantized: each block of
    ``act_block(group_size)`` values along the last dim is rounded (half to even)
    to int8 with scale max|x|/127. Returns fp32 ``xhat``."""
    K = x.shape[-1]
    B = act_block(group_size)
    xb = x.reshape(-1, K // B, B).float()
    amax = xb.abs().amax(-1, keepdim=True)
    # true division (torch evaluates `127.0 / t` as reciprocal(t) * 127, which rounds differently)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    xq = torch.round(xb * inv).clamp(-127, 127)
    return (xq * (amax / 127.0)).view(x.shape)


def quant_matmul_int8_act(x, qweight, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """Exact model (fp64) of the CPU kernels: ``xhat @ W^T (+ bias)`` with
    ``xhat = quantize_activations_int8(x)``. The kernels differ from it only by
    fp32 rounding."""
    N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    xhat = quantize_activations_int8(x, group_size).reshape(-1, K).double()
    y = xhat @ dequantize(qweight, scales, zeros, bits, group_size).double().t()
    if bias is not None:
        y = y + bias.double()
    return y.view(*x.shape[:-1], N)


def outliers_dense(row_ptr, col_idx, values, N: int, K: int) -> torch.Tensor:
    """The CSR outliers as a dense fp32 ``[N, K]`` (contents fully validated)."""
    return SparseOutliers(row_ptr, col_idx, values, (N, K)).to_dense(torch.float32)


def gwq_matmul(x, qweight, scales, zeros, bits: int, group_size: int, row_ptr, col_idx, values,
               bias=None) -> torch.Tensor:
    """``x @ (dequantize(W) + S)^T (+ bias)`` in fp32, cast to x.dtype."""
    N, K = check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)
    w = dequantize(qweight, scales, zeros, bits, group_size) + outliers_dense(row_ptr, col_idx, values, N, K)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gwq_matmul_int8_act(x, qweight, scales, zeros, bits: int, group_size: int, row_ptr, col_idx, values,
                        bias=None) -> torch.Tensor:
    """Exact model (fp64) of the CPU gwq kernels: the dense part on the int8
    activations (:func:`quant_matmul_int8_act`), the outliers on the unquantized ones."""
    N, K = check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)
    y = quant_matmul_int8_act(x, qweight, scales, zeros, bits, group_size, bias)
    s = outliers_dense(row_ptr, col_idx, values, N, K).double()
    return y + (x.reshape(-1, K).double() @ s.t()).view(*x.shape[:-1], N)


def _lora_factors(adapter, bits_hi: int, group_a: int, group_b: int):
    """Dequantized ``A [r, K]`` (hi rows, then lo rows) and ``B'^T [r, N]`` of the 12 adapter tensors."""
    parts = [dequantize(*adapter[3 * i: 3 * i + 3], bits, G) for i, (bits, G) in
             enumerate(((bits_hi, group_a), (bits_hi, group_b), (1, group_a), (1, group_b)))]
    return torch.cat([parts[0], parts[2]], 0), torch.cat([parts[1], parts[3]], 0)


def lora_delta(x, adapter, bits_hi: int, group_a: int, group_b: int, scale: float, xhat=None) -> torch.Tensor:
    """``scale * (x A^T) B'^T`` in fp64 (x: ``[..., K]``), the adapter's contribution. ``xhat`` replaces x
    in the shrink (the int8 model)."""
    A, Bt = _lora_factors(adapter, bits_hi, group_a, group_b)
    K = A.shape[1]
    xs = (x if xhat is None else xhat).reshape(-1, K).double()
    t = xs @ A.double().t()
    return (scale * (t @ Bt.double())).view(*x.shape[:-1], Bt.shape[1])


def lora_mixed(x, base, adapter, bits_hi: int, group_a: int, group_b: int, scale: float) -> torch.Tensor:
    """``base + scale * ((x A_hi^T) B_hi'^T + (x A_lo^T) B_lo'^T)`` in fp32, cast to base's dtype."""
    check_lora_mixed(x, base, adapter, bits_hi, group_a, group_b, scale)
    return (base.float() + lora_delta(x.float(), adapter, bits_hi, group_a, group_b, scale).float()).to(base.dtype)


def lora_mixed_int8_act(x, base, adapter, bits_hi: int, group_a: int, group_b: int, scale: float) -> torch.Tensor:
    """Exact model (fp64) of the CPU lora_mixed: the shrink on the int8 activations of
    :func:`quantize_activations_int8` (group ``group_a``), everything else exact."""
    check_lora_mixed(x, base, adapter, bits_hi, group_a, group_b, scale)
    xhat = quantize_activations_int8(x, group_a)
    return base.double() + lora_delta(x, adapter, bits_hi, group_a, group_b, scale, xhat=xhat)


def quant_matmul_lora(x, qweight, scales, zeros, bits: int, group_size: int, bias, adapter, bits_hi: int,
                      group_a: int, group_b: int, scale: float) -> torch.Tensor:
    """``x @ W^T (+ bias) + scale * (x A^T) B'^T``: a quantized layer and its compressed adapter, in fp32."""
    check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                            scale)
    y = quant_matmul(x.float(), qweight, scales, zeros, bits, group_size, bias)
    return (y + lora_delta(x.float(), adapter, bits_hi, group_a, group_b, scale).float()).to(x.dtype)


def quant_matmul_lora_int8_act(x, qweight, scales, zeros, bits: int, group_size: int, bias, adapter, bits_hi: int,
                               group_a: int, group_b: int, scale: float) -> torch.Tensor:
    """Exact model (fp64) of the CPU quant_matmul_lora."""
    check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                            scale)
    y = quant_matmul_int8_act(x, qweight, scales, zeros, bits, group_size, bias)
    xhat = quantize_activations_int8(x, group_a)
    return y + lora_delta(x, adapter, bits_hi, group_a, group_b, scale, xhat=xhat)


def bank_factors(bank, table, slot: int, group_a: int, group_b: int):
    """``(kind, A [r, K], B^T [r, N], h)`` of one slot of a layer bank, fp32 (compressed: dequantized, high
    rows then 1-bit rows). Raises for an empty (removed) slot or offsets outside the slabs."""
    from ..multilora.bank import KIND_COMPRESSED, KIND_DENSE
    N, K = bank[1].shape[1], bank[0].shape[1]
    if not 0 <= slot < table.shape[0]:
        raise IndexError(f"lorakern: adapter slot {slot} is out of range [0, {table.shape[0]})")
    kind, r, row, h, bits, aoff, boff = (int(v) for v in table[slot].tolist())
    if kind == KIND_DENSE:
        if row < 0 or r < 0 or row + r > bank[0].shape[0]:
            raise ValueError("lorakern: bank table: dense rows out of the slab")
        return kind, bank[0][row: row + r].float(), bank[1][row: row + r].float(), 0
    if kind != KIND_COMPRESSED:
        raise ValueError(f"lorakern: adapter slot {slot} is empty (the adapter was removed)")
    rl = r - h
    if row < 0 or h < 0 or rl < 0 or row + r > bank[3].shape[0]:
        raise ValueError("lorakern: bank table: bad compressed slot")

    def part(codes, off, scales, zeros, rows, cols, nbits, G):
        rb = cols * nbits // 8
        if off < 0 or off + rows * rb > codes.numel():
            raise ValueError("lorakern: bank table: compressed codes out of the slab")
        return dequantize(codes[off: off + rows * rb].view(rows, rb), scales[:rows].contiguous(),
                          zeros[:rows].contiguous(), nbits, G)
    qa, qas, qaz, qb, qbs, qbz = bank[2:]
    A = torch.cat([part(qa, aoff, qas[row:], qaz[row:], h, K, bits, group_a),
                   part(qa, aoff + h * (K * bits // 8), qas[row + h:], qaz[row + h:], rl, K, 1, group_a)])
    Bt = torch.cat([part(qb, boff, qbs[row:], qbz[row:], h, N, bits, group_b),
                    part(qb, boff + h * (N * bits // 8), qbs[row + h:], qbz[row + h:], rl, N, 1, group_b)])
    return kind, A, Bt, h


def _segments(segments, tokens, T: int):
    E = tokens.shape[0]
    pos = 0
    for sid, start, count in segments.tolist():
        if start != pos or count < 0 or start + count > E:
            raise ValueError("lorakern: segments must partition the entries in order")
        pos += count
        yield sid, start, count
    if pos != E:
        raise ValueError("lorakern: segments must cover every entry")
    if E and (int(tokens.min()) < 0 or int(tokens.max()) >= T):
        raise IndexError(f"lorakern: a token index is outside [0, {T})")


def _shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, int8: bool):
    from ..multilora.bank import KIND_COMPRESSED
    T = x.shape[0]
    t = torch.zeros(tokens.shape[0], max_rank, dtype=torch.float64, device=x.device)
    for sid, s0, n in _segments(segments, tokens, T):
        kind, A, _, _ = bank_factors(bank, table, sid, group_a, group_b)
        r = A.shape[0]
        if r > max_rank:
            raise ValueError(f"lorakern: adapter {sid} has rank {r} > max_rank={max_rank}")
        xs = x[tokens[s0: s0 + n]].float()
        if int8 and kind == KIND_COMPRESSED and r:
            xs = quantize_activations_int8(xs, group_a)
        coef = weights[s0: s0 + n].double() * float(scales[sid])
        t[s0: s0 + n, :r] = coef[:, None] * (xs.double() @ A.double().t())
    return t


def lora_shrink(x, bank, table, scales, group_a: int, group_b: int, segments, tokens, weights,
                max_rank: int, max_count: int = -1) -> torch.Tensor:
    """``t[e, :r] = w_e * scale * x[token_e] A^T`` for every entry (fp32 ``[E, max_rank]``, zero past each rank)."""
    check_lora_shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    return _shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, False).float()


def lora_shrink_int8_act(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank):
    """Exact model (fp64) of the CPU shrink: compressed adapters see int8 activations (group ``group_a``)."""
    check_lora_shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    return _shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, True)


def _expand(t, base, bank, table, group_a, group_b, segments, tokens):
    y = base.double().clone()
    for sid, s0, n in _segments(segments, tokens, base.shape[0]):
        _, _, Bt, _ = bank_factors(bank, table, sid, group_a, group_b)
        r = Bt.shape[0]
        if r > t.shape[1]:
            raise ValueError(f"lorakern: adapter {sid} has rank {r} > t's width {t.shape[1]}")
        y.index_add_(0, tokens[s0: s0 + n], t[s0: s0 + n, :r].double() @ Bt.double())
    return y


def lora_expand(t, base, bank, table, scales, group_a: int, group_b: int, segments, tokens, max_count: int = -1,
                mixture: bool = True) -> torch.Tensor:
    """``y = base``, then ``y[token_e] += t[e, :r] B^T`` for every entry; in base's dtype."""
    check_lora_expand(t, base, bank, table, scales, group_a, group_b, segments, tokens)
    return _expand(t, base, bank, table, group_a, group_b, segments, tokens).to(base.dtype)


def multi_lora(x, base, bank, table, scales, group_a: int, group_b: int, segments, tokens, weights,
               max_rank: int, max_count: int = -1, mixture: bool = True) -> torch.Tensor:
    """``base + sum over x's entries of w * scale * (x A^T) B^T``: lora_shrink then lora_expand."""
    check_multi_lora(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    t = _shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, False)
    return _expand(t, base, bank, table, group_a, group_b, segments, tokens).to(base.dtype)


def multi_lora_int8_act(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank):
    """Exact model (fp64) of the CPU multi_lora."""
    check_multi_lora(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    t = _shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, True)
    return _expand(t, base, bank, table, group_a, group_b, segments, tokens)


def _slices(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank, int8):
    widths = check_multi_lora_slices(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights,
                                     max_rank)
    outs, col = [], 0
    for i, n in enumerate(widths):
        args = (banks[8 * i: 8 * i + 8], tables[i], scales[i], group_a[i], group_b[i])
        b = base[:, col: col + n]
        t = _shrink(x, *args, segments, tokens, weights, max_rank, int8)
        outs.append(_expand(t, b, args[0], args[1], args[3], args[4], segments, tokens))
        col += n
    return torch.cat(outs, 1)


def multi_lora_slices(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank: int,
                      max_count: int = -1, mixture: bool = True) -> torch.Tensor:
    """multi_lora for every slice (its own bank) into its columns of ``base [T, sum N]``."""
    return _slices(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank,
                   False).to(base.dtype)


def multi_lora_slices_int8_act(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank):
    """Exact model (fp64) of the CPU multi_lora_slices."""
    return _slices(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank, True)


# Any device without a dedicated kernel runs the reference.
lib.impl("quant_matmul", quant_matmul, "CompositeExplicitAutograd")
lib.impl("dequantize", dequantize, "CompositeExplicitAutograd")
lib.impl("gwq_matmul", gwq_matmul, "CompositeExplicitAutograd")
lib.impl("lora_mixed", lora_mixed, "CompositeExplicitAutograd")
lib.impl("quant_matmul_lora", quant_matmul_lora, "CompositeExplicitAutograd")
lib.impl("lora_shrink", lora_shrink, "CompositeExplicitAutograd")
lib.impl("lora_expand", lora_expand, "CompositeExplicitAutograd")
lib.impl("multi_lora", multi_lora, "CompositeExplicitAutograd")
lib.impl("multi_lora_slices", multi_lora_slices, "CompositeExplicitAutograd")
