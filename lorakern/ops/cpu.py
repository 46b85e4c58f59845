"""CPU backend: the C++ kernels (lorakern._C), generic/AVX2/AVX-512 chosen at run time.

Each function registers itself as its op's CPU kernel (and, where marked, as the eager fast path)
with :func:`lorakern.ops.registry.kernel`. Records cross into C++ by name: a compressed adapter as
four :class:`~lorakern.formats.lora.LoraPartView`, a layer bank as a
:class:`~lorakern.formats.bank.BankView` (``lk_qweight`` / ``lk_bank`` in the C ABI).
"""
from __future__ import annotations

import torch

from .._native import native
from ..formats.bank import BankView
from ..formats.lora import LoraPartView, LoraParts
from .registry import helper, kernel
from .schemas import (_check_batch, _check_scale, check_grad_input, check_outliers, check_quant_matmul_qalora,
                      check_gwq_matmul, check_lora, check_lora_expand, check_lora_mixed,
                      check_lora_shrink, check_multi_lora, check_multi_lora_slices, check_quant_matmul,
                      check_quant_matmul_lora, check_qweight)

__all__ = ["GRAD_GEMM_MIN_ROWS", "GRAD_GEMM_TILE_ROWS", "PreparedBank", "PreparedLoRA", "bank_view", "dequantize_cpu", "grad_input_cpu", "gwq_matmul_cpu",
           "gwq_matmul_grad_input_cpu", "quant_matmul_grad_input_cpu", "quant_matmul_qalora_cpu", "lora_expand_cpu",
           "lora_mixed_cpu", "lora_shrink_cpu", "multi_lora_cpu", "multi_lora_slices_cpu", "quant_matmul_cpu",
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


@kernel("quant_matmul", "cpu", eager=True)
def quant_matmul_cpu(x, qweight, scales, zeros, bits, group_size, bias=None):
    N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    return _matmul_run(native().quant_matmul, (), x, qweight, scales, zeros, bits, group_size, bias, N, K)


def _matmul_run(fn, extra, x, qweight, scales, zeros, bits, group_size, bias, N, K):
    """``fn`` (a quant_matmul-shaped binding) on x as ``[M, K]``: ``extra`` goes between the bias and y."""
    x2, qweight, scales, zeros, b = _prepare(x, K, qweight, scales, zeros, bias)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype)
    if M and N:
        fn(x2.data_ptr(), _DTYPE_CODE[x.dtype], M, qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), N, K,
           bits, group_size, b.data_ptr() if b is not None else 0, *extra, y.data_ptr(), torch.get_num_threads())
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


@kernel("gwq_matmul", "cpu", eager=True)
def gwq_matmul_cpu(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias=None):
    N, K = check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)
    row_ptr, col_idx, values = row_ptr.contiguous(), col_idx.contiguous(), values.contiguous()
    try:
        return _matmul_run(native().gwq_matmul, (row_ptr.data_ptr(), col_idx.data_ptr(), values.data_ptr(),
                                                 values.shape[0]), x, qweight, scales, zeros, bits, group_size, bias,
                           N, K)
    except RuntimeError as e:
        if "invalid argument" in str(e):
            raise ValueError("lorakern: gwq_matmul: the outlier CSR is inconsistent (row_ptr must start at 0, "
                             "not decrease and end at nnz; every column must be < K)") from None
        raise


#: from this many gradient rows on, grad_input dequantizes row tiles of W and multiplies them with torch's GEMM
GRAD_GEMM_MIN_ROWS = 64
GRAD_GEMM_TILE_ROWS = 256


def grad_input_cpu(grad, qweight, scales, zeros, bits, group_size, N, K, outliers=None):
    """``grad [..., N] @ (W + S)`` (arguments validated by the caller). Up to :data:`GRAD_GEMM_MIN_ROWS` rows:
    ``lk_quant_matmul_grad_input``. From there on (training batches): W is dequantized by the C++ core in tiles
    of :data:`GRAD_GEMM_TILE_ROWS` rows (never whole; the tile's outliers added), each multiplied in with torch's
    GEMM (MKL/oneDNN), which a register-tiled GEMM of our own would only match."""
    if grad.numel() == 0:  # no rows, or a layer with N = 0 outputs
        return torch.zeros((*grad.shape[:-1], K), dtype=grad.dtype)
    g2 = grad.reshape(-1, N)
    g2 = g2 if g2.is_contiguous() else g2.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    M = g2.shape[0]
    if M >= GRAD_GEMM_MIN_ROWS:
        return _grad_input_tiled_gemm(g2, qweight, scales, zeros, bits, group_size, N, K, outliers).to(
            grad.dtype).view(*grad.shape[:-1], K)
    dx = torch.empty((M, K), dtype=grad.dtype)
    if M:
        if outliers is None:
            csr, nnz = (0, 0, 0), 0
        else:
            row_ptr, col_idx, values = (t.contiguous() for t in outliers)
            csr, nnz = (row_ptr.data_ptr(), col_idx.data_ptr(), values.data_ptr()), values.shape[0]
        try:
            native().quant_matmul_grad_input(g2.data_ptr(), _DTYPE_CODE[grad.dtype], M, qweight.data_ptr(),
                                             scales.data_ptr(), zeros.data_ptr(), N, K, bits, group_size, *csr, nnz,
                                             dx.data_ptr(), torch.get_num_threads())
        except RuntimeError as e:
            if "invalid argument" in str(e) and outliers is not None:
                raise ValueError("lorakern: gwq_matmul_grad_input: the outlier CSR is inconsistent (row_ptr must "
                                 "start at 0, not decrease and end at nnz; every column must be < K)") from None
            raise
    return dx.view(*grad.shape[:-1], K)


def _grad_input_tiled_gemm(g2, qweight, scales, zeros, bits, group_size, N, K, outliers):
    if outliers is not None:  # the C++ path validates the CSR itself; here, before any index is used
        row_ptr, col_idx, values = (t.contiguous() for t in outliers)
        nnz = values.shape[0]
        if (int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((row_ptr.diff() < 0).any())
                or (nnz and int(col_idx.to(torch.int32).max()) >= K)):
            raise ValueError("lorakern: gwq_matmul_grad_input: the outlier CSR is inconsistent (row_ptr must "
                             "start at 0, not decrease and end at nnz; every column must be < K)")
    g32 = g2.float()
    dx = torch.zeros((g2.shape[0], K), dtype=torch.float32)
    rb, ng, R = qweight.shape[1], K // group_size, GRAD_GEMM_TILE_ROWS
    tile = torch.empty((min(R, N), K), dtype=torch.float32)
    threads = torch.get_num_threads()
    for n0 in range(0, N, R):
        n1 = min(N, n0 + R)
        t = tile[: n1 - n0]
        native().dequantize(qweight.data_ptr() + n0 * rb, scales.data_ptr() + 2 * n0 * ng,
                            zeros.data_ptr() + 2 * n0 * ng, n1 - n0, K, bits, group_size, t.data_ptr(), threads)
        if outliers is not None:
            j0, j1 = int(row_ptr[n0]), int(row_ptr[n1])
            if j1 > j0:
                rows = torch.repeat_interleave(torch.arange(n1 - n0), row_ptr[n0: n1 + 1].diff().long())
                t.index_put_((rows, col_idx[j0:j1].long()), values[j0:j1].float(), accumulate=True)
        dx.addmm_(g32[:, n0:n1], t)
    return dx


@kernel("quant_matmul_grad_input", "cpu")
def quant_matmul_grad_input_cpu(grad, qweight, scales, zeros, bits, group_size):
    N, K = check_grad_input(grad, qweight, scales, zeros, bits, group_size)
    return grad_input_cpu(grad, qweight, scales, zeros, bits, group_size, N, K)


@kernel("gwq_matmul_grad_input", "cpu")
def gwq_matmul_grad_input_cpu(grad, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values):
    N, K = check_grad_input(grad, qweight, scales, zeros, bits, group_size)
    check_outliers(row_ptr, col_idx, values, N, K, qweight.device)
    return grad_input_cpu(grad, qweight, scales, zeros, bits, group_size, N, K, (row_ptr, col_idx, values))


@kernel("quant_matmul_qalora", "cpu", eager=True)
def quant_matmul_qalora_cpu(x, qweight, scales, zeros, bits, group_size, bias, A, Bt, scale):
    N, K, r = check_quant_matmul_qalora(x, qweight, scales, zeros, bits, group_size, bias, A, Bt, scale)
    A = A if A.dtype == torch.float32 and A.is_contiguous() else A.to(torch.float32).contiguous()
    Bt = Bt if Bt.dtype == torch.float32 and Bt.is_contiguous() else Bt.to(torch.float32).contiguous()
    return _matmul_run(native().quant_matmul_qalora, (A.data_ptr(), Bt.data_ptr(), r, float(scale)), x, qweight,
                       scales, zeros, bits, group_size, bias, N, K)


@kernel("dequantize", "cpu")
def dequantize_cpu(qweight, scales, zeros, bits, group_size):
    N, K = check_qweight(qweight, scales, zeros, bits, group_size)
    out = torch.empty((N, K), dtype=torch.float32)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    if N:
        native().dequantize(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), N, K, bits, group_size,
                            out.data_ptr(), torch.get_num_threads())
    return out


def _lora_record(adapter, bits_hi: int, group_a: int, group_b: int, N: int, K: int, scale: float):
    """The adapter as the C++ core's ``lk_lora`` (``_C.LoraRecord``: four :class:`LoraPartView` and the scale),
    its rank, and the contiguous tensors it points into (kept alive by the caller)."""
    views, keep = _lora_parts(adapter, bits_hi, group_a, group_b, N, K)
    return native().LoraRecord(views, float(scale)), _rank(views), keep


def _lora_parts(adapter, bits_hi: int, group_a: int, group_b: int, N: int, K: int):
    """The four :class:`LoraPartView` of ``lk_lora``, and the contiguous tensors they point into."""
    views, keep = [], []
    shapes = LoraParts(a_hi=(bits_hi, group_a, K), b_hi=(bits_hi, group_b, N), a_lo=(1, group_a, K),
                       b_lo=(1, group_b, N))
    for tensors, (bits, G, cols) in zip(LoraParts.of(adapter), shapes):
        q, s, z = (t.contiguous() for t in tensors)
        keep += [q, s, z]
        views.append(LoraPartView(q.data_ptr(), s.data_ptr(), z.data_ptr(), q.shape[0], cols, bits, G))
    return views, keep


def _rank(views) -> int:
    """The adapter's rank: rows of its A parts."""
    return views[0].N + views[2].N


@kernel("lora_mixed", "cpu")
def lora_mixed_cpu(x, base, adapter, bits_hi, group_a, group_b, scale):
    N, K = check_lora_mixed(x, base, adapter, bits_hi, group_a, group_b, scale)
    record, rank, _keep = _lora_record(adapter, bits_hi, group_a, group_b, N, K, scale)
    return _lora_mixed_run(x, base, N, K, record, rank)


def _lora_mixed_run(x, base, N, K, record, rank):
    x2 = x.reshape(-1, K)
    b2 = base.reshape(-1, N)
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    b2 = b2 if b2.is_contiguous() else b2.contiguous()
    M = x2.shape[0]
    if not rank:  # rank 0: nothing to add (the C ABI cannot even tell N)
        return b2.clone().view(base.shape)
    y = torch.empty((M, N), dtype=x.dtype)
    if M and N:
        native().lora_mixed(x2.data_ptr(), _DTYPE_CODE[x.dtype], M, record, b2.data_ptr(), y.data_ptr(),
                            torch.get_num_threads())
    return y.view(base.shape)


@kernel("quant_matmul_lora", "cpu")
def quant_matmul_lora_cpu(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                          scale):
    N, K = check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a,
                                   group_b, scale)
    record, _rank_, _keep = _lora_record(adapter, bits_hi, group_a, group_b, N, K, scale)
    return _quant_matmul_lora_run(x, qweight, scales, zeros, bits, group_size, bias, N, K, record)


def _quant_matmul_lora_run(x, qweight, scales, zeros, bits, group_size, bias, N, K, record):
    return _matmul_run(native().quant_matmul_lora, (record,), x, qweight, scales, zeros, bits, group_size, bias,
                       N, K)


def bank_view(bank, table, scales, group_a, group_b) -> BankView:
    """A layer bank's :class:`BankView` (``lk_bank``): the slab addresses and sizes the C++ core decodes the
    slot table against. The tensors must stay alive (and contiguous) while the view is used."""
    a, bt, qa, qas, qaz, qb, qbs, qbz = bank
    return BankView(table.data_ptr(), scales.data_ptr(), table.shape[0], _DTYPE_CODE[a.dtype], group_a, group_b,
                    a.data_ptr(), a.shape[0], bt.data_ptr(), qa.data_ptr(), qa.numel(), qas.data_ptr(),
                    qaz.data_ptr(), qas.shape[0], qb.data_ptr(), qb.numel(), qbs.data_ptr(), qbz.data_ptr())


def _contiguous_bank(bank, table, scales):
    return [b if b.is_contiguous() else b.contiguous() for b in bank], table.contiguous(), scales.contiguous()


def _batch_args(segments, tokens, weights) -> tuple:
    """The batch's addresses and sizes as the bindings take them (segments, count, tokens, weights, entries)."""
    return segments.data_ptr(), segments.shape[0], tokens.data_ptr(), weights.data_ptr(), tokens.shape[0]


def _batch_errors(fn, *args):
    """Call a multi-adapter binding; the C core's generic argument error becomes a clear ValueError."""
    try:
        fn(*args, torch.get_num_threads())
    except RuntimeError as e:
        if "invalid argument" in str(e):
            raise ValueError("lorakern: the batch does not fit the bank (segments must partition the entries in "
                             "order, tokens lie in [0, T), max_rank covers every adapter used, and compressed "
                             "adapters of one call share their group sizes)") from None
        raise


@kernel("lora_shrink", "cpu")
def lora_shrink_cpu(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, max_count=-1):
    N, K = check_lora_shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    x, (bank, table, scales) = x.contiguous(), _contiguous_bank(bank, table, scales)
    segments, tokens, weights = segments.contiguous(), tokens.contiguous(), weights.contiguous()
    t = torch.zeros((tokens.shape[0], max_rank), dtype=torch.float32)
    if x.shape[0] == 0 and tokens.shape[0] == 0:
        return t
    _batch_errors(native().lora_shrink, x.data_ptr(), _DTYPE_CODE[x.dtype], x.shape[0], K, N,
                  bank_view(bank, table, scales, group_a, group_b), *_batch_args(segments, tokens, weights),
                  t.data_ptr(), max_rank)
    return t


@kernel("lora_expand", "cpu")
def lora_expand_cpu(t, base, bank, table, scales, group_a, group_b, segments, tokens, max_count=-1, mixture=True):
    N, K = check_lora_expand(t, base, bank, table, scales, group_a, group_b, segments, tokens)
    t, base, (bank, table, scales) = t.contiguous(), base.contiguous(), _contiguous_bank(bank, table, scales)
    segments, tokens = segments.contiguous(), tokens.contiguous()
    y = torch.empty_like(base)
    ones = torch.ones(tokens.shape[0], dtype=torch.float32)
    _batch_errors(native().lora_expand, t.data_ptr(), t.shape[1], base.shape[0], K, N,
                  bank_view(bank, table, scales, group_a, group_b), *_batch_args(segments, tokens, ones),
                  _DTYPE_CODE[base.dtype], base.data_ptr(), y.data_ptr())
    return y


@kernel("multi_lora", "cpu")
def multi_lora_cpu(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank,
                   max_count=-1, mixture=True):
    N, K = check_multi_lora(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    x, base, (bank, table, scales) = x.contiguous(), base.contiguous(), _contiguous_bank(bank, table, scales)
    segments, tokens, weights = segments.contiguous(), tokens.contiguous(), weights.contiguous()
    y = torch.empty_like(base)
    _batch_errors(native().multi_lora, x.data_ptr(), _DTYPE_CODE[x.dtype], x.shape[0], K, N,
                  bank_view(bank, table, scales, group_a, group_b), *_batch_args(segments, tokens, weights),
                  max_rank, base.data_ptr(), y.data_ptr())  # the core checks max_rank against every adapter met
    return y


@kernel("multi_lora_slices", "cpu")
def multi_lora_slices_cpu(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank,
                          max_count=-1, mixture=True):
    widths = check_multi_lora_slices(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights,
                                     max_rank)
    x, base = x.contiguous(), base.contiguous()
    views, keep = [], []
    for i in range(len(tables)):
        b, t, s = _contiguous_bank(banks[8 * i: 8 * i + 8], tables[i], scales[i])
        keep.append((b, t, s))
        views.append(bank_view(b, t, s, group_a[i], group_b[i]))
    segments, tokens, weights = segments.contiguous(), tokens.contiguous(), weights.contiguous()
    y = torch.empty_like(base)
    _batch_errors(native().multi_lora_slices, x.data_ptr(), _DTYPE_CODE[x.dtype], x.shape[0], x.shape[1], views,
                  widths, *_batch_args(segments, tokens, weights), max_rank, base.data_ptr(), y.data_ptr(),
                  base.shape[1])
    return y


@helper("prepared_bank")
class PreparedBank:
    """A layer bank's :class:`BankView`, built once per bank change, for repeated eager CPU calls
    (``LayerBank.apply``): only the activations and the batch's sizes are checked per call (O(1)); the C++
    core checks every slot, segment and token. Keeps the bank's tensors alive."""

    def __init__(self, bank, table, scales, group_a, group_b):
        self._keep = _contiguous_bank(bank, table, scales)
        self.view = bank_view(*self._keep, group_a, group_b)

    def multi_lora(self, N: int, K: int, x, base, batch, inplace: bool = False):
        """``base + the batch's adapters applied to x`` (x ``[T, K]``, base ``[T, N]``, one dtype): a new tensor, or
        ``inplace``: added into ``base`` (contiguous, not overlapping x), which is returned."""
        code = _DTYPE_CODE.get(x.dtype)
        if (code is None or x.dim() != 2 or x.shape[1] != K or base.dtype != x.dtype or base.dim() != 2
                or base.shape[0] != x.shape[0] or base.shape[1] != N or batch.num_tokens != x.shape[0]):
            raise ValueError(f"lorakern: multi_lora: x {tuple(x.shape)} {x.dtype} / base {tuple(base.shape)} "
                             f"{base.dtype} do not fit the layer ({N}, {K}) and a batch of {batch.num_tokens} tokens")
        x = x if x.is_contiguous() else x.contiguous()
        base, y = _base_and_output(base, x, inplace)
        _batch_errors(native().multi_lora, x.data_ptr(), code, x.shape[0], K, N, self.view,
                      *_batch_args(*_batch_tensors(batch, x.device)), -1, base.data_ptr(), y.data_ptr())
        return y


def _batch_tensors(batch, device) -> tuple:
    """A LoRABatch's (segments, tokens, weights), checked (dtypes, shapes, device) and contiguous."""
    _check_batch(batch.segments, batch.tokens, batch.weights, device)
    return tuple(t if t.is_contiguous() else t.contiguous() for t in (batch.segments, batch.tokens, batch.weights))


def _base_and_output(base, x, inplace: bool) -> tuple:
    """``(base, y)`` for a multi-adapter call: ``inplace``, y is base itself, which must be contiguous, must not need
    grad and must not overlap ``x`` (address ranges compared: views of one storage and separate storages over one
    buffer alike); its version counter is bumped (the C++ core writes through its pointer), unless it is an
    inference tensor (which has none). Else base made contiguous and a new y."""
    if not inplace:
        base = base if base.is_contiguous() else base.contiguous()
        return base, torch.empty_like(base)
    if not base.is_contiguous():
        raise ValueError("lorakern: an in-place multi-adapter call needs a contiguous output")
    if base.requires_grad:
        raise RuntimeError("lorakern: an in-place multi-adapter call's output requires grad (use the out-of-place call)")
    b0, x0 = base.data_ptr(), x.data_ptr()
    if b0 < x0 + x.numel() * x.element_size() and x0 < b0 + base.numel() * base.element_size():
        raise ValueError("lorakern: an in-place multi-adapter call's output shares memory with x")
    if not base.is_inference():
        torch.autograd.graph.increment_version(base)
    return base, base


@helper("multi_lora_slices_prepared")
def multi_lora_slices_prepared(banks: list, x, base, batch, inplace: bool = False):
    """``multi_lora_slices`` over :class:`PreparedBank` objects (one per output slice, each built once per bank change):
    ``base [T, sum of N]`` plus each slice's adapters in its own columns, for repeated eager CPU calls (the
    fused q/k/v and gate/up of vLLM's LoRA layers). ``banks``: LayerBanks (their pointers prepared once per change);
    every bank's K, the widths, the activations and the batch are checked here (O(1)), the C++ core checks every
    slot, segment and token. ``inplace``: the adapters are added into ``base`` (contiguous, not overlapping x),
    which is returned; else a new tensor."""
    K = x.shape[-1] if x.dim() else -1
    bad = [i for i, lb in enumerate(banks) if lb.K != K]
    if bad:
        raise ValueError(f"lorakern: multi_lora_slices: slice {bad[0]} takes K={banks[bad[0]].K}, x has {K} features")
    widths = [lb.N for lb in banks]
    prepared = [lb.prepared() for lb in banks]
    max_rank = max(lb.max_rank() for lb in banks)
    code = _DTYPE_CODE.get(x.dtype)
    if (code is None or x.dim() != 2 or x.shape[1] != K or base.dtype != x.dtype or base.dim() != 2
            or base.shape[0] != x.shape[0] or base.shape[1] != sum(widths) or batch.num_tokens != x.shape[0]):
        raise ValueError(f"lorakern: multi_lora_slices: x must be [T, {K}] (fp32/fp16/bf16) and base must be "
                         f"{x.dtype} [T, {sum(widths)}] (slices {list(widths)}) with T = the batch's "
                         f"{batch.num_tokens} tokens; got x {tuple(x.shape)} {x.dtype}, base {tuple(base.shape)} "
                         f"{base.dtype}")
    x = x if x.is_contiguous() else x.contiguous()
    base, y = _base_and_output(base, x, inplace)
    _batch_errors(native().multi_lora_slices, x.data_ptr(), code, x.shape[0], K, [p.view for p in prepared],
                  widths, *_batch_args(*_batch_tensors(batch, x.device)), max_rank, base.data_ptr(),
                  y.data_ptr(), base.shape[1])
    return y


@helper("route_top_k")
def route_top_k_cpu(logits: torch.Tensor, k: int):
    """Top-k routing of a mixture in one C++ call (``lk_route_top_k``): ``logits`` fp32 ``[T, E]`` (CPU) ->
    ``(segments int64 [E, 3], tokens int64 [T*k], weights fp32 [T*k])``, the entries grouped by expert (every
    expert has a segment, empty ones too), ties to the lower expert, weights renormalised over the k kept.

    Raises:
        ValueError: ``k`` outside ``[1, E]``, or non-finite logits."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.device.type != "cpu":
        raise TypeError(f"lorakern: logits must be fp32 [T, E] on the CPU, got {logits.dtype} {tuple(logits.shape)}")
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"lorakern: top_k={k} must be in [1, {E}]")
    logits = logits if logits.is_contiguous() else logits.contiguous()
    segments = torch.empty(E, 3, dtype=torch.int64)
    tokens = torch.empty(T * k, dtype=torch.int64)
    weights = torch.empty(T * k, dtype=torch.float32)
    try:
        native().route_top_k(logits.data_ptr(), T, E, k, segments.data_ptr(), tokens.data_ptr(), weights.data_ptr())
    except RuntimeError as e:
        if "invalid argument" in str(e):
            raise ValueError("lorakern: router logits contain NaN or Inf (or more than 2^20 experts)") from None
        raise
    return segments, tokens, weights


@helper("prepared_lora")
class PreparedLoRA:
    """A compressed adapter validated once, for repeated eager CPU calls (LoRALinear's fast path).

    Holds the 12 tensors (contiguous) and the record the C++ binding takes (``LoraRecord``). Each call
    then checks only the activations (and the base weight, which QuantLinear checks anyway).
    ``matches(tensors)`` says whether it was built from these very tensor objects.
    """

    def __init__(self, adapter, bits_hi: int, group_a: int, group_b: int, N: int, K: int, scale: float):
        check_lora(adapter, bits_hi, group_a, group_b, N, K, torch.device("cpu"))
        _check_scale(scale)
        self._args = (bits_hi, group_a, group_b, N, K, float(scale))
        self.source = list(adapter)
        self.N, self.K, self.scale = N, K, float(scale)
        self.record, self.rank, self._keep = _lora_record(adapter, bits_hi, group_a, group_b, N, K, scale)

    def __reduce__(self):  # the C record holds addresses: copies and pickles rebuild it from the tensors
        return type(self), (self.source, *self._args)

    def matches(self, adapter) -> bool:
        return len(adapter) == len(self.source) and all(a is b for a, b in zip(adapter, self.source))

    def _check_x(self, x):
        if x.dtype not in _DTYPE_CODE:
            raise TypeError(f"lorakern: x must be float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.K:
            raise ValueError(f"lorakern: x has shape {tuple(x.shape)}, expected last dimension K={self.K}")

    def _lean(self, x, base) -> int:
        """x's dtype code when (x, base) is the decode case the C ABI takes as is (2-D, contiguous, one dtype,
        [M, K] and [M, N], rank > 0); -1 otherwise. The fewest tensor queries that decide it: they are most of
        a small adapter's per-call cost."""
        code = _DTYPE_CODE.get(x.dtype, -1)
        xs = x.shape
        if (code < 0 or len(xs) != 2 or xs[1] != self.K or base.shape != (xs[0], self.N) or base.dtype != x.dtype
                or not self.rank or not (x.is_contiguous() and base.is_contiguous())):
            return -1
        return code

    def _run(self, x, code: int, base, y) -> None:
        """The C ABI on the lean case (``_lean``); y may be base."""
        if x.shape[0]:
            native().lora_mixed(x.data_ptr(), code, x.shape[0], self.record, base.data_ptr(), y.data_ptr(),
                                torch.get_num_threads())

    def lora_mixed(self, x, base):
        """``base + adapter(x)`` (base: ``[..., N]`` in x's dtype), a new tensor."""
        code = self._lean(x, base)
        if code >= 0:  # the decode case, lean
            y = torch.empty_like(base)
            self._run(x, code, base, y)
            return y
        self._check_x(x)
        if base.dtype != x.dtype or base.shape[:-1] != x.shape[:-1] or base.shape[-1] != self.N:
            raise ValueError(f"lorakern: base {tuple(base.shape)} {base.dtype} does not match x {tuple(x.shape)} "
                             f"{x.dtype} and N={self.N}")
        return _lora_mixed_run(x, base, self.N, self.K, self.record, self.rank)

    def lora_mixed_(self, x, base):
        """``base += adapter(x)`` in place (base: ``[..., N]`` in x's dtype); returns ``base``. For callers that
        own a fresh base output (an engine's ``y += lora(x)``): no output allocation. Raises as
        :meth:`lora_mixed`; a base that needs grad is refused (in-place on an autograd leaf)."""
        if base.requires_grad:
            raise RuntimeError("lorakern: lora_mixed_ adds in place; base requires grad (use lora_mixed)")
        code = self._lean(x, base)
        if code < 0:
            return base.copy_(self.lora_mixed(x, base))
        self._run(x, code, base, base)  # the C ABI reads each base element before it writes y there
        return base

    def quant_matmul_lora(self, x, qweight, scales, zeros, bits, group_size, bias):
        """``x W^T (+ bias) + adapter(x)`` in one call."""
        N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
        if (N, K) != (self.N, self.K):
            raise ValueError(f"lorakern: the adapter is for a {(self.N, self.K)} layer, the weight is {(N, K)}")
        return _quant_matmul_lora_run(x, qweight, scales, zeros, bits, group_size, bias, N, K, self.record)

