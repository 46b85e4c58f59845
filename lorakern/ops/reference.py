"""The plain-torch reference backend: every op computed in fp32/fp64 from the format's definition, the
ground truth the kernels are tested against, and the backend of any device without its own kernels.

The exact models of the CPU kernels' numerics (int8 activations) that only tests use live in
:mod:`lorakern.testing`."""
from __future__ import annotations

import torch

from ..formats.bank import BankSlabs, SlotKind, SlotRow, compressed_code_bytes
from ..formats.outliers import SparseOutliers
from ..formats.packing import unpack_codes
from .schemas import (check_grad_input, check_outliers, check_quant_matmul_qalora, check_multi_lora_slices, check_gwq_matmul, check_lora_expand, check_lora_mixed, check_lora_shrink, check_multi_lora, check_quant_matmul, check_quant_matmul_lora, check_qweight,
                      lib)

__all__ = ["bank_factors", "dense_weight", "dequantize", "gwq_matmul", "gwq_matmul_grad_input", "qalora_pool",
           "quant_matmul_grad_input", "quant_matmul_qalora", "lora_delta", "lora_expand", "lora_mixed", "lora_shrink",
           "multi_lora", "multi_lora_fp64", "multi_lora_slices", "multi_lora_slices_fp64", "outliers_dense", "quant_matmul", "quant_matmul_lora"]


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


def outliers_dense(row_ptr, col_idx, values, N: int, K: int) -> torch.Tensor:
    """The CSR outliers as a dense fp32 ``[N, K]`` (contents fully validated)."""
    return SparseOutliers(row_ptr, col_idx, values, (N, K)).to_dense(torch.float32)


def gwq_matmul(x, qweight, scales, zeros, bits: int, group_size: int, row_ptr, col_idx, values,
               bias=None) -> torch.Tensor:
    """``x @ (dequantize(W) + S)^T (+ bias)`` in fp32, cast to x.dtype."""
    N, K = check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)
    w = dense_weight(qweight, scales, zeros, bits, group_size, (row_ptr, col_idx, values))
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dense_weight(qweight, scales, zeros, bits: int, group_size: int, outliers=None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The effective ``[N, K]`` weight ``dequantize(W) (+ S)`` in ``dtype`` (float64: exact; ``outliers`` =
    ``(row_ptr, col_idx, values)``)."""
    w = dequantize(qweight, scales, zeros, bits, group_size).to(dtype)
    if outliers is not None:
        w = w + outliers_dense(*outliers, *w.shape).to(dtype)
    return w


def quant_matmul_grad_input(grad, qweight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """``grad @ dequantize(W)`` in fp32, cast to grad's dtype: quant_matmul's gradient with respect to x."""
    check_grad_input(grad, qweight, scales, zeros, bits, group_size)
    return (grad.float() @ dequantize(qweight, scales, zeros, bits, group_size)).to(grad.dtype)


def gwq_matmul_grad_input(grad, qweight, scales, zeros, bits: int, group_size: int, row_ptr, col_idx,
                          values) -> torch.Tensor:
    """``grad @ (dequantize(W) + S)`` in fp32, cast to grad's dtype: gwq_matmul's gradient with respect to x."""
    N, K = check_grad_input(grad, qweight, scales, zeros, bits, group_size)
    check_outliers(row_ptr, col_idx, values, N, K, qweight.device)
    w = dense_weight(qweight, scales, zeros, bits, group_size, (row_ptr, col_idx, values))
    return (grad.float() @ w).to(grad.dtype)


def qalora_pool(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """QA-LoRA's input pooling: the mean of ``x [..., K]`` over each group of ``group_size`` features,
    ``[..., K / group_size]`` (arXiv 2309.14717, Eq. 3; PEFT's ``use_qalora`` multiplies this by K / G)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size).mean(-1)


def quant_matmul_qalora(x, qweight, scales, zeros, bits: int, group_size: int, bias, A, Bt,
                        scale: float) -> torch.Tensor:
    """``x @ W^T (+ bias) + scale * (pool_G(x) A^T) Bt`` in fp32 (exact pooling), cast to x's dtype."""
    check_quant_matmul_qalora(x, qweight, scales, zeros, bits, group_size, bias, A, Bt, scale)
    y = quant_matmul(x.float(), qweight, scales, zeros, bits, group_size, bias)
    y = y + scale * (qalora_pool(x.float(), group_size) @ A.float().t()) @ Bt.float()
    return y.to(x.dtype)


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


def quant_matmul_lora(x, qweight, scales, zeros, bits: int, group_size: int, bias, adapter, bits_hi: int,
                      group_a: int, group_b: int, scale: float) -> torch.Tensor:
    """``x @ W^T (+ bias) + scale * (x A^T) B'^T``: a quantized layer and its compressed adapter, in fp32."""
    check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                            scale)
    y = quant_matmul(x.float(), qweight, scales, zeros, bits, group_size, bias)
    return (y + lora_delta(x.float(), adapter, bits_hi, group_a, group_b, scale).float()).to(x.dtype)


def bank_factors(bank, table, slot: int, group_a: int, group_b: int):
    """``(kind, A [r, K], B^T [r, N], h)`` of one slot of a layer bank, fp32 (compressed: dequantized, high
    rows then 1-bit rows). Raises for an empty (removed) slot or offsets outside the slabs."""
    bank = BankSlabs(*bank)
    N, K = bank.bt.shape[1], bank.a.shape[1]
    if not 0 <= slot < table.shape[0]:
        raise IndexError(f"lorakern: adapter slot {slot} is out of range [0, {table.shape[0]})")
    t = SlotRow(*(int(v) for v in table[slot].tolist()))
    if t.kind == SlotKind.DENSE:
        if t.row < 0 or t.rank < 0 or t.row + t.rank > bank.a.shape[0]:
            raise ValueError("lorakern: bank table: dense rows out of the slab")
        return t.kind, bank.a[t.row: t.row + t.rank].float(), bank.bt[t.row: t.row + t.rank].float(), 0
    if t.kind != SlotKind.COMPRESSED:
        raise ValueError(f"lorakern: adapter slot {slot} is empty (the adapter was removed)")
    if t.row < 0 or t.h < 0 or t.h > t.rank or t.row + t.rank > bank.qa_scales.shape[0]:
        raise ValueError("lorakern: bank table: bad compressed slot")

    def factor(codes, off, scales, zeros, cols, G):
        if off < 0 or off + compressed_code_bytes(cols, t.rank, t.h, t.bits_hi) > codes.numel():
            raise ValueError("lorakern: bank table: compressed codes out of the slab")
        parts, row = [], t.row
        for rows, nbits in ((t.h, t.bits_hi), (t.rank - t.h, 1)):  # high rows, then 1-bit rows
            rb = cols * nbits // 8
            parts.append(dequantize(codes[off: off + rows * rb].view(rows, rb), scales[row: row + rows].contiguous(),
                                    zeros[row: row + rows].contiguous(), nbits, G))
            off, row = off + rows * rb, row + rows
        return torch.cat(parts)
    A = factor(bank.qa, t.a_off, bank.qa_scales, bank.qa_zeros, K, group_a)
    Bt = factor(bank.qb, t.b_off, bank.qb_scales, bank.qb_zeros, N, group_b)
    return t.kind, A, Bt, t.h


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


def _shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, act=None):
    """The shrink in fp64; ``act(xs, group_a)`` (if given) replaces a compressed adapter's activations
    (the int8 model of :mod:`lorakern.testing`)."""
    T = x.shape[0]
    t = torch.zeros(tokens.shape[0], max_rank, dtype=torch.float64, device=x.device)
    for sid, s0, n in _segments(segments, tokens, T):
        kind, A, _, _ = bank_factors(bank, table, sid, group_a, group_b)
        r = A.shape[0]
        if r > max_rank:
            raise ValueError(f"lorakern: adapter {sid} has rank {r} > max_rank={max_rank}")
        xs = x[tokens[s0: s0 + n]].float()
        if act is not None and kind == SlotKind.COMPRESSED and r:
            xs = act(xs, group_a)
        coef = weights[s0: s0 + n].double() * float(scales[sid])
        t[s0: s0 + n, :r] = coef[:, None] * (xs.double() @ A.double().t())
    return t


def lora_shrink(x, bank, table, scales, group_a: int, group_b: int, segments, tokens, weights,
                max_rank: int, max_count: int = -1) -> torch.Tensor:
    """``t[e, :r] = w_e * scale * x[token_e] A^T`` for every entry (fp32 ``[E, max_rank]``, zero past each rank)."""
    check_lora_shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    return _shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank).float()


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
    return multi_lora_fp64(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights,
                           max_rank).to(base.dtype)


def multi_lora_fp64(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, act=None):
    """:func:`multi_lora` in fp64 (not cast back). ``act(xs, group_a)``, if given, replaces the activations
    compressed adapters see (``lorakern.testing`` passes the CPU kernels' int8 quantization)."""
    check_multi_lora(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    t = _shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, act)
    return _expand(t, base, bank, table, group_a, group_b, segments, tokens)


def multi_lora_slices_fp64(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank,
                           act=None):
    """:func:`multi_lora_slices` in fp64 (not cast back); ``act`` as in :func:`multi_lora_fp64`."""
    widths = check_multi_lora_slices(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights,
                                     max_rank)
    outs, col = [], 0
    for i, n in enumerate(widths):
        args = (banks[8 * i: 8 * i + 8], tables[i], scales[i], group_a[i], group_b[i])
        b = base[:, col: col + n]
        t = _shrink(x, *args, segments, tokens, weights, max_rank, act)
        outs.append(_expand(t, b, args[0], args[1], args[3], args[4], segments, tokens))
        col += n
    return torch.cat(outs, 1)


def multi_lora_slices(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank: int,
                      max_count: int = -1, mixture: bool = True) -> torch.Tensor:
    """multi_lora for every slice (its own bank) into its columns of ``base [T, sum N]``."""
    return multi_lora_slices_fp64(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights,
                                  max_rank).to(base.dtype)


# Any device without a dedicated kernel runs the reference.
lib.impl("quant_matmul", quant_matmul, "CompositeExplicitAutograd")
lib.impl("dequantize", dequantize, "CompositeExplicitAutograd")
lib.impl("gwq_matmul", gwq_matmul, "CompositeExplicitAutograd")
lib.impl("quant_matmul_grad_input", quant_matmul_grad_input, "CompositeExplicitAutograd")
lib.impl("gwq_matmul_grad_input", gwq_matmul_grad_input, "CompositeExplicitAutograd")
lib.impl("quant_matmul_qalora", quant_matmul_qalora, "CompositeExplicitAutograd")
lib.impl("lora_mixed", lora_mixed, "CompositeExplicitAutograd")
lib.impl("quant_matmul_lora", quant_matmul_lora, "CompositeExplicitAutograd")
lib.impl("lora_shrink", lora_shrink, "CompositeExplicitAutograd")
lib.impl("lora_expand", lora_expand, "CompositeExplicitAutograd")
lib.impl("multi_lora", multi_lora, "CompositeExplicitAutograd")
lib.impl("multi_lora_slices", multi_lora_slices, "CompositeExplicitAutograd")
