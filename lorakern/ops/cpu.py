"""CPU backend: the C++ kernels (lorakern._C), generic/AVX2/AVX-512 chosen at run time."""
from __future__ import annotations

import torch

from .._native import native
from .schemas import check_multi_lora_slices, check_lora_expand, check_lora_shrink, check_multi_lora, check_gwq_matmul, check_lora_mixed, check_quant_matmul, check_quant_matmul_lora, check_qweight

__all__ = ["multi_lora_slices_cpu", "bank_fields", "multi_lora_prepared", "lora_expand_cpu", "lora_shrink_cpu", "multi_lora_cpu", "PreparedLoRA", "quant_matmul_cpu", "gwq_matmul_cpu", "dequantize_cpu", "lora_mixed_cpu",
           "quant_matmul_lora_cpu"]

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _prepare(x, K, qweight, scales, zeros, bias):
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if not (qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()):
        qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    b = None
    if bias is not None:
        b = bias if bias.dtype == torch.float32 and bias.is_contiguous() else bias.to(torch.float32).contiguous()
    return x2, qweight, scales, zeros, b


def quant_matmul_cpu(x, qweight, scales, zeros, bits, group_size, bias=None):
    N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    x2, qweight, scales, zeros, b = _prepare(x, K, qweight, scales, zeros, bias)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype)
    if M and N:
        native().quant_matmul(x2.data_ptr(), _DTYPE_CODE[x.dtype], M, qweight.data_ptr(), scales.data_ptr(),
                              zeros.data_ptr(), N, K, bits, group_size, b.data_ptr() if b is not None else 0,
                              y.data_ptr(), torch.get_num_threads())
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


def gwq_matmul_cpu(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias=None):
    N, K = check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)
    x2, qweight, scales, zeros, b = _prepare(x, K, qweight, scales, zeros, bias)
    row_ptr, col_idx, values = row_ptr.contiguous(), col_idx.contiguous(), values.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype)
    if M and N:
        try:
            native().gwq_matmul(x2.data_ptr(), _DTYPE_CODE[x.dtype], M, qweight.data_ptr(), scales.data_ptr(),
                                zeros.data_ptr(), N, K, bits, group_size, row_ptr.data_ptr(), col_idx.data_ptr(),
                                values.data_ptr(), values.shape[0], b.data_ptr() if b is not None else 0,
                                y.data_ptr(), torch.get_num_threads())
        except RuntimeError as e:
            if "invalid argument" in str(e):
                raise ValueError("lorakern: gwq_matmul: the outlier CSR is inconsistent (row_ptr must start at 0, "
                                 "not decrease and end at nnz; every column must be < K)") from None
            raise
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


def dequantize_cpu(qweight, scales, zeros, bits, group_size):
    N, K = check_qweight(qweight, scales, zeros, bits, group_size)
    out = torch.empty((N, K), dtype=torch.float32)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    if N:
        native().dequantize(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), N, K, bits, group_size,
                            out.data_ptr(), torch.get_num_threads())
    return out


def _lora_parts(adapter, bits_hi: int, group_a: int, group_b: int, N: int, K: int):
    """The 28 fields (4 parts x qweight, scales, zeros, rows, cols, bits, group) the C++ binding takes, and the
    contiguous tensors they point into (kept alive by the caller)."""
    fields, keep = [], []
    for i, (bits, G, cols) in enumerate(((bits_hi, group_a, K), (bits_hi, group_b, N), (1, group_a, K),
                                         (1, group_b, N))):
        q, s, z = (t.contiguous() for t in adapter[3 * i: 3 * i + 3])
        keep += [q, s, z]
        fields += [q.data_ptr(), s.data_ptr(), z.data_ptr(), q.shape[0], cols, bits, G]
    return fields, keep


def lora_mixed_cpu(x, base, adapter, bits_hi, group_a, group_b, scale):
    N, K = check_lora_mixed(x, base, adapter, bits_hi, group_a, group_b, scale)
    fields, _keep = _lora_parts(adapter, bits_hi, group_a, group_b, N, K)
    return _lora_mixed_run(x, base, N, K, fields, scale)


def _lora_mixed_run(x, base, N, K, fields, scale):
    x2 = x.reshape(-1, K)
    b2 = base.reshape(-1, N)
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    b2 = b2 if b2.is_contiguous() else b2.contiguous()
    M = x2.shape[0]
    if not any(fields[3::7]):  # rank 0: nothing to add (the C ABI cannot even tell N)
        return b2.clone().view(base.shape)
    y = torch.empty((M, N), dtype=x.dtype)
    if M and N:
        native().lora_mixed(x2.data_ptr(), _DTYPE_CODE[x.dtype], M, fields, float(scale), b2.data_ptr(),
                            y.data_ptr(), torch.get_num_threads())
    return y.view(base.shape)


def quant_matmul_lora_cpu(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                          scale):
    N, K = check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a,
                                   group_b, scale)
    fields, _keep = _lora_parts(adapter, bits_hi, group_a, group_b, N, K)
    return _quant_matmul_lora_run(x, qweight, scales, zeros, bits, group_size, bias, N, K, fields, scale)


def _quant_matmul_lora_run(x, qweight, scales, zeros, bits, group_size, bias, N, K, fields, scale):
    x2, qweight, scales, zeros, b = _prepare(x, K, qweight, scales, zeros, bias)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype)
    if M and N:
        native().quant_matmul_lora(x2.data_ptr(), _DTYPE_CODE[x.dtype], M, qweight.data_ptr(), scales.data_ptr(),
                                   zeros.data_ptr(), N, K, bits, group_size, b.data_ptr() if b is not None else 0,
                                   fields, float(scale), y.data_ptr(), torch.get_num_threads())
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


def bank_fields(bank, table, scales, group_a, group_b) -> list[int]:
    """The 18 fields of a layer bank the C++ binding takes (BankView in csrc/python/bindings.cpp)."""
    a, bt, qa, qas, qaz, qb, qbs, qbz = bank
    return [table.data_ptr(), scales.data_ptr(), table.shape[0], _DTYPE_CODE[a.dtype], group_a, group_b,
            a.data_ptr(), a.shape[0], bt.data_ptr(), qa.data_ptr(), qa.numel(), qas.data_ptr(), qaz.data_ptr(),
            qas.shape[0], qb.data_ptr(), qb.numel(), qbs.data_ptr(), qbz.data_ptr()]


def _run_multi(mode, x, x_dtype, T, K, N, bank, table, scales, group_a, group_b, segments, tokens, weights, t, ldt,
               base, y):
    bank = [b if b.is_contiguous() else b.contiguous() for b in bank]
    table, scales = table.contiguous(), scales.contiguous()
    segments, tokens = segments.contiguous(), tokens.contiguous()
    weights = weights.contiguous() if weights is not None else None
    ptr = lambda v: v.data_ptr() if v is not None else 0  # noqa: E731
    try:
        native().multi_lora(mode, ptr(x), _DTYPE_CODE[x_dtype], T, K, N,
                            bank_fields(bank, table, scales, group_a, group_b), segments.data_ptr(),
                            segments.shape[0], tokens.data_ptr(), ptr(weights), tokens.shape[0], ptr(t), ldt,
                            ptr(base), ptr(y), torch.get_num_threads())
    except RuntimeError as e:
        if "invalid argument" in str(e):
            raise ValueError("lorakern: the batch does not fit the bank (segments must partition the entries in "
                             "order, tokens lie in [0, T), max_rank covers every adapter used, and compressed "
                             "adapters of one call share their group sizes)") from None
        raise


def lora_shrink_cpu(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, max_count=-1):
    N, K = check_lora_shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    x = x.contiguous()
    t = torch.zeros((tokens.shape[0], max_rank), dtype=torch.float32)
    if x.shape[0] == 0 and tokens.shape[0] == 0:
        return t
    _run_multi(0, x, x.dtype, x.shape[0], K, N, bank, table, scales, group_a, group_b, segments, tokens, weights,
               t, max_rank, None, None)
    return t


def lora_expand_cpu(t, base, bank, table, scales, group_a, group_b, segments, tokens, max_count=-1, mixture=True):
    N, K = check_lora_expand(t, base, bank, table, scales, group_a, group_b, segments, tokens)
    t, base = t.contiguous(), base.contiguous()
    y = torch.empty_like(base)
    ones = torch.ones(tokens.shape[0], dtype=torch.float32)
    _run_multi(1, None, base.dtype, base.shape[0], K, N, bank, table, scales, group_a, group_b, segments, tokens,
               ones, t, t.shape[1], base, y)
    return y


def multi_lora_cpu(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank,
                   max_count=-1, mixture=True):
    N, K = check_multi_lora(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    x, base = x.contiguous(), base.contiguous()
    y = torch.empty_like(base)
    _run_multi(2, x, x.dtype, x.shape[0], K, N, bank, table, scales, group_a, group_b, segments, tokens, weights,
               None, max_rank, base, y)  # the fused call checks max_rank against the adapters it meets
    return y


def multi_lora_slices_cpu(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank,
                          max_count=-1, mixture=True):
    widths = check_multi_lora_slices(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights,
                                     max_rank)
    x, base = x.contiguous(), base.contiguous()
    banks = [b if b.is_contiguous() else b.contiguous() for b in banks]
    tables, scales = [t.contiguous() for t in tables], [s.contiguous() for s in scales]
    segments, tokens, weights = segments.contiguous(), tokens.contiguous(), weights.contiguous()
    fields = [bank_fields(banks[8 * i: 8 * i + 8], tables[i], scales[i], group_a[i], group_b[i])
              for i in range(len(tables))]
    y = torch.empty_like(base)
    try:
        native().multi_lora_slices(x.data_ptr(), _DTYPE_CODE[x.dtype], x.shape[0], x.shape[1], fields, widths,
                                   segments.data_ptr(), segments.shape[0], tokens.data_ptr(), weights.data_ptr(),
                                   tokens.shape[0], max_rank, base.data_ptr(), y.data_ptr(), base.shape[1],
                                   torch.get_num_threads())
    except RuntimeError as e:
        if "invalid argument" in str(e):
            raise ValueError("lorakern: the batch does not fit the banks (segments must partition the entries in "
                             "order, tokens lie in [0, T))") from None
        raise
    return y


def multi_lora_prepared(fields: list[int], N: int, K: int, x, base, batch):
    """The eager CPU fast path of multi_lora (MultiLoRALinear, LayerBank.apply): ``fields`` are a bank's
    cached :func:`bank_fields`; only the activations and the batch's sizes are checked here (O(1)), the
    C++ side checks every slot, segment and token."""
    code = _DTYPE_CODE.get(x.dtype)
    if (code is None or x.dim() != 2 or x.shape[1] != K or base.dtype != x.dtype or base.dim() != 2
            or base.shape[0] != x.shape[0] or base.shape[1] != N or batch.num_tokens != x.shape[0]):
        raise ValueError(f"lorakern: multi_lora: x {tuple(x.shape)} {x.dtype} / base {tuple(base.shape)} {base.dtype} "
                         f"do not fit the layer ({N}, {K}) and a batch of {batch.num_tokens} tokens")
    x = x if x.is_contiguous() else x.contiguous()
    base = base if base.is_contiguous() else base.contiguous()
    y = torch.empty_like(base)
    seg, tok, wt = batch.segments, batch.tokens, batch.weights
    try:
        native().multi_lora(2, x.data_ptr(), code, x.shape[0], K, N, fields, seg.data_ptr(), seg.shape[0],
                            tok.data_ptr(), wt.data_ptr(), tok.shape[0], 0, 1 << 30, base.data_ptr(), y.data_ptr(),
                            torch.get_num_threads())
    except RuntimeError as e:
        if "invalid argument" in str(e):
            raise ValueError("lorakern: the batch does not fit the bank") from None
        raise
    return y


class PreparedLoRA:
    """A compressed adapter validated once, for repeated eager CPU calls (LoRALinear's fast path).

    Holds the 12 tensors (contiguous) and the field list the C++ binding takes. Each call
    then checks only the activations (and the base weight, which QuantLinear checks anyway).
    ``matches(tensors)`` says whether it was built from these very tensor objects.
    """

    def __init__(self, adapter, bits_hi: int, group_a: int, group_b: int, N: int, K: int, scale: float):
        from .schemas import _check_scale, check_lora
        check_lora(adapter, bits_hi, group_a, group_b, N, K, torch.device("cpu"))
        _check_scale(scale)
        self.source = list(adapter)
        self.N, self.K, self.scale = N, K, float(scale)
        self.fields, self._keep = _lora_parts(adapter, bits_hi, group_a, group_b, N, K)
        self.rank = sum(self.fields[3::7]) // 2

    def matches(self, adapter) -> bool:
        return len(adapter) == len(self.source) and all(a is b for a, b in zip(adapter, self.source))

    def _check_x(self, x):
        if x.dtype not in _DTYPE_CODE:
            raise TypeError(f"lorakern: x must be float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.K:
            raise ValueError(f"lorakern: x has shape {tuple(x.shape)}, expected last dimension K={self.K}")

    def lora_mixed(self, x, base):
        """``base + adapter(x)`` (base: ``[..., N]`` in x's dtype)."""
        code = _DTYPE_CODE.get(x.dtype)
        if (code is not None and x.dim() == 2 and base.dim() == 2 and base.dtype == x.dtype
                and x.shape[1] == self.K and base.shape[1] == self.N and base.shape[0] == x.shape[0]
                and x.is_contiguous() and base.is_contiguous() and self.rank):  # the decode case, lean
            y = torch.empty_like(base)
            if x.shape[0]:
                native().lora_mixed(x.data_ptr(), code, x.shape[0], self.fields, self.scale, base.data_ptr(),
                                    y.data_ptr(), torch.get_num_threads())
            return y
        self._check_x(x)
        if base.dtype != x.dtype or base.shape[:-1] != x.shape[:-1] or base.shape[-1] != self.N:
            raise ValueError(f"lorakern: base {tuple(base.shape)} {base.dtype} does not match x {tuple(x.shape)} "
                             f"{x.dtype} and N={self.N}")
        return _lora_mixed_run(x, base, self.N, self.K, self.fields, self.scale)

    def quant_matmul_lora(self, x, qweight, scales, zeros, bits, group_size, bias):
        """``x W^T (+ bias) + adapter(x)`` in one call."""
        N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
        if (N, K) != (self.N, self.K):
            raise ValueError(f"lorakern: the adapter is for a {(self.N, self.K)} layer, the weight is {(N, K)}")
        return _quant_matmul_lora_run(x, qweight, scales, zeros, bits, group_size, bias, N, K, self.fields,
                                      self.scale)


torch.library.register_kernel("lorakern::lora_mixed", "cpu", lora_mixed_cpu)
torch.library.register_kernel("lorakern::quant_matmul_lora", "cpu", quant_matmul_lora_cpu)
torch.library.register_kernel("lorakern::quant_matmul", "cpu", quant_matmul_cpu)
torch.library.register_kernel("lorakern::dequantize", "cpu", dequantize_cpu)
torch.library.register_kernel("lorakern::gwq_matmul", "cpu", gwq_matmul_cpu)
torch.library.register_kernel("lorakern::lora_shrink", "cpu", lora_shrink_cpu)
torch.library.register_kernel("lorakern::lora_expand", "cpu", lora_expand_cpu)
torch.library.register_kernel("lorakern::multi_lora", "cpu", multi_lora_cpu)
torch.library.register_kernel("lorakern::multi_lora_slices", "cpu", multi_lora_slices_cpu)
