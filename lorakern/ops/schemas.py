"""Schemas, argument checks and fake (shape-only) implementations of every op.

One place for the contract of each op; the backends (``reference``, ``cpu``,
``cuda``) register kernels beside it. The checks run before any kernel, in the
fake implementation too, so torch.compile reports bad calls at trace time.
"""
from __future__ import annotations

import torch

from ..formats.packing import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

__all__ = ["lib", "check_bank", "check_grad_input", "check_quant_matmul_qalora", "check_multi_lora_slices", "check_lora_expand", "check_lora_shrink", "check_multi_lora", "check_gwq_matmul", "check_lora", "check_lora_mixed", "check_outliers", "check_quant_matmul",
           "check_quant_matmul_lora", "check_qweight", "ACT_DTYPES", "LORA_PARTS"]

lib = torch.library.Library("lorakern", "DEF")

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

lib.define(
    "quant_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
    "Tensor? bias=None) -> Tensor"
)
lib.define("dequantize(Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor")
lib.define(
    "gwq_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
    "Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias=None) -> Tensor"
)

# Gradients with respect to x of quant_matmul / gwq_matmul (their autograd formulas, lorakern.ops.autograd):
# grad [..., N] -> [..., K] = grad @ (W + S), W the exact dequantized weight.
lib.define("quant_matmul_grad_input(Tensor grad, Tensor qweight, Tensor scales, Tensor zeros, int bits, "
           "int group_size) -> Tensor")
lib.define("gwq_matmul_grad_input(Tensor grad, Tensor qweight, Tensor scales, Tensor zeros, int bits, "
           "int group_size, Tensor row_ptr, Tensor col_idx, Tensor values) -> Tensor")
# QA-LoRA (arXiv 2309.14717) unmerged: quant_matmul plus scale * (pool_G(x) A^T) B^T, A [r, K / G], B^T [r, N].
lib.define("quant_matmul_qalora(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
           "Tensor? bias, Tensor A, Tensor Bt, float scale) -> Tensor")

# A compressed (LoRAQuant) adapter travels as 12 tensors, three per part (packed codes, fp16 scales, fp16
# zeros): A_hi [h, K], B'^T_hi [h, N], A_lo [r-h, K], B'^T_lo [r-h, N]. Empty parts have 0 rows.
LORA_PARTS = ("a_hi", "b_hi", "a_lo", "b_lo")
lib.define(
    "lora_mixed(Tensor x, Tensor base, Tensor[] adapter, int bits_hi, int group_a, int group_b, float scale) "
    "-> Tensor"
)
lib.define(
    "quant_matmul_lora(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
    "Tensor? bias, Tensor[] adapter, int bits_hi, int group_a, int group_b, float scale) -> Tensor"
)

# Multi-adapter ops over a layer's adapter bank (lorakern.multilora.LayerBank): `bank` is its 8 slabs
# [A, B^T, A codes, A scales, A zeros, B^T codes, B^T scales, B^T zeros], `table` int64 [S, 7]
# (kind, rank, row, h, bits_hi, a_off, b_off) and `scales` fp32 [S]; the batch (LoRABatch) is
# segments int64 [nseg, 3] (id, first entry, count), tokens int64 [E], weights fp32 [E].
_BANK = "Tensor[] bank, Tensor table, Tensor scales, int group_a, int group_b"
# max_count (the largest segment, -1: unknown) and mixture (whether a token may sit in several segments) are
# launch hints the GPU kernels take from the host-side LoRABatch, so that no layer synchronises; the CPU
# kernels do not need them.
lib.define(f"lora_shrink(Tensor x, {_BANK}, Tensor segments, Tensor tokens, Tensor weights, int max_rank, "
           "int max_count=-1) -> Tensor")
lib.define(f"lora_expand(Tensor t, Tensor base, {_BANK}, Tensor segments, Tensor tokens, int max_count=-1, "
           "bool mixture=True) -> Tensor")
lib.define(f"multi_lora(Tensor x, Tensor base, {_BANK}, Tensor segments, Tensor tokens, Tensor weights, "
           "int max_rank, int max_count=-1, bool mixture=True) -> Tensor")
# Several output slices of one input in one call (fused q/k/v of different widths): one bank per slice
# (8 slabs each, flattened), base and the result [T, sum of the slices' N], slices in order.
lib.define("multi_lora_slices(Tensor x, Tensor base, Tensor[] banks, Tensor[] tables, Tensor[] scales, "
           "int[] group_a, int[] group_b, Tensor segments, Tensor tokens, Tensor weights, int max_rank, "
           "int max_count=-1, bool mixture=True) -> Tensor")


def check_qweight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  group_size: int) -> tuple[int, int]:
    """Validate a packed weight's tensors; return its logical (N, K)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"lorakern: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"lorakern: group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"lorakern: qweight must be a 2-D uint8 tensor, got {qweight.dtype} of shape {tuple(qweight.shape)}")
    N, rb = qweight.shape
    if (rb * 8) % bits:
        raise ValueError(f"lorakern: qweight rows of {rb} bytes do not hold whole {bits}-bit codes")
    K = rb * 8 // bits
    if K == 0 or K % group_size:
        raise ValueError(f"lorakern: K={K} must be a positive multiple of group_size={group_size}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != torch.float16:
            raise TypeError(f"lorakern: {name} must be float16, got {t.dtype}")
        if tuple(t.shape) != (N, K // group_size):
            raise ValueError(f"lorakern: {name} must have shape {(N, K // group_size)}, got {tuple(t.shape)}")
        if t.device != qweight.device:
            raise ValueError(f"lorakern: {name} is on {t.device} but qweight is on {qweight.device}")
    return N, K


def _check_activation(t, name: str, width: int, wname: str, device) -> None:
    """``t [..., width]`` in fp32/fp16/bf16 on the weight's device (x of the matmuls, grad of their gradients)."""
    if t.dtype not in ACT_DTYPES:
        raise TypeError(f"lorakern: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < 1 or t.shape[-1] != width:
        raise ValueError(f"lorakern: {name} has shape {tuple(t.shape)}, expected last dimension {wname}={width}")
    if t.device != device:
        raise ValueError(f"lorakern: {name} is on {t.device} but the weight is on {device}")


def check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias) -> tuple[int, int]:
    """Validate quant_matmul's arguments; return (N, K)."""
    N, K = check_qweight(qweight, scales, zeros, bits, group_size)
    _check_activation(x, "x", K, "K", qweight.device)
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"lorakern: bias must have shape ({N},), got {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"lorakern: bias must be floating point, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"lorakern: bias is on {bias.device} but x is on {x.device}")
    return N, K


def check_grad_input(grad, qweight, scales, zeros, bits, group_size) -> tuple[int, int]:
    """Validate a ``*_grad_input`` op's gradient and weight; return (N, K)."""
    N, K = check_qweight(qweight, scales, zeros, bits, group_size)
    _check_activation(grad, "grad", N, "N", qweight.device)
    return N, K


def check_quant_matmul_qalora(x, qweight, scales, zeros, bits, group_size, bias, A, Bt, scale) -> tuple[int, int, int]:
    """Validate quant_matmul_qalora's arguments; return (N, K, rank)."""
    N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    for name, t in (("A", A), ("Bt", Bt)):
        if not t.dtype.is_floating_point or t.dim() != 2:
            raise TypeError(f"lorakern: QA-LoRA {name} must be a 2-D floating tensor, got {t.dtype} {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"lorakern: QA-LoRA {name} is on {t.device} but x is on {x.device}")
    r = A.shape[0]
    if A.shape[1] != K // group_size:
        raise ValueError(f"lorakern: QA-LoRA A must have K / group_size = {K // group_size} columns (one per "
                         f"quantization group), got {tuple(A.shape)}")
    if tuple(Bt.shape) != (r, N):
        raise ValueError(f"lorakern: QA-LoRA Bt must have shape {(r, N)}, got {tuple(Bt.shape)}")
    _check_scale(scale)
    return N, K, r


def check_outliers(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, N: int, K: int,
                   device: torch.device) -> None:
    """Validate the CSR tensors' dtypes, shapes and devices (O(1); the kernels
    guard every row pointer and column they read, SparseOutliers.validate checks
    the contents)."""
    if K > 65536:
        raise ValueError(f"lorakern: outliers need K <= 65536 (uint16 columns), got K={K}")
    if row_ptr.dtype != torch.int32 or row_ptr.dim() != 1 or row_ptr.shape[0] != N + 1:
        raise TypeError(f"lorakern: row_ptr must be int32 of shape ({N + 1},), got {row_ptr.dtype} {tuple(row_ptr.shape)}")
    if col_idx.dtype != torch.uint16 or col_idx.dim() != 1:
        raise TypeError(f"lorakern: col_idx must be a 1-D uint16 tensor, got {col_idx.dtype} {tuple(col_idx.shape)}")
    if values.dtype != torch.float16 or values.dim() != 1:
        raise TypeError(f"lorakern: values must be a 1-D float16 tensor, got {values.dtype} {tuple(values.shape)}")
    if col_idx.shape[0] != values.shape[0]:
        raise ValueError(f"lorakern: {col_idx.shape[0]} column indices but {values.shape[0]} values")
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx), ("values", values)):
        if t.device != device:
            raise ValueError(f"lorakern: {name} is on {t.device} but the weight is on {device}")


def check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias):
    """Validate gwq_matmul's arguments; return (N, K)."""
    N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    check_outliers(row_ptr, col_idx, values, N, K, qweight.device)
    return N, K


def check_lora(adapter, bits_hi: int, group_a: int, group_b: int, N: int, K: int, device) -> tuple[int, int]:
    """Validate a compressed adapter's 12 tensors against an ``[N, K]`` layer; return ``(h, r)``."""
    if len(adapter) != 12:
        raise ValueError(f"lorakern: a compressed adapter is 12 tensors (3 per part {LORA_PARTS}), got {len(adapter)}")
    if bits_hi not in (2, 3, 4, 8):
        raise ValueError(f"lorakern: bits_hi must be 2, 3, 4 or 8, got {bits_hi}")
    rows = {}
    for i, part in enumerate(LORA_PARTS):
        q, sc, z = adapter[3 * i: 3 * i + 3]
        bits = bits_hi if part.endswith("hi") else 1
        G = group_a if part.startswith("a") else group_b
        try:
            n, k = check_qweight(q, sc, z, bits, G)
        except (TypeError, ValueError) as e:
            raise type(e)(f"lorakern: adapter part {part}: {str(e).removeprefix('lorakern: ')}") from None
        want = K if part.startswith("a") else N
        if k != want:
            raise ValueError(f"lorakern: adapter part {part} has {k} columns, expected {want} "
                             f"({'in' if part.startswith('a') else 'out'}_features)")
        if q.device != device:
            raise ValueError(f"lorakern: adapter part {part} is on {q.device}, expected {device}")
        rows[part] = n
    if rows["a_hi"] != rows["b_hi"] or rows["a_lo"] != rows["b_lo"]:
        raise ValueError(f"lorakern: adapter parts disagree on their ranks: {rows}")
    return rows["a_hi"], rows["a_hi"] + rows["a_lo"]


def _check_scale(scale: float) -> None:
    if not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"lorakern: scale must be a finite number, got {scale!r}")


def check_lora_mixed(x, base, adapter, bits_hi, group_a, group_b, scale) -> tuple[int, int]:
    """Validate lora_mixed's arguments; return (N, K)."""
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"lorakern: x must be float32, float16 or bfloat16, got {x.dtype}")
    if base.dtype != x.dtype:
        raise TypeError(f"lorakern: base must have x's dtype {x.dtype}, got {base.dtype}")
    if x.dim() < 1 or base.dim() != x.dim() or base.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"lorakern: base {tuple(base.shape)} must be x {tuple(x.shape)} with a new last dimension")
    if base.device != x.device:
        raise ValueError(f"lorakern: base is on {base.device} but x is on {x.device}")
    N, K = base.shape[-1], x.shape[-1]
    check_lora(adapter, bits_hi, group_a, group_b, N, K, x.device)
    _check_scale(scale)
    return N, K


def check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a,
                            group_b, scale) -> tuple[int, int]:
    """Validate quant_matmul_lora's arguments; return (N, K)."""
    N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    check_lora(adapter, bits_hi, group_a, group_b, N, K, x.device)
    _check_scale(scale)
    return N, K


def check_bank(bank, table, scales, group_a: int, group_b: int, device) -> tuple[int, int]:
    """Validate a layer bank's tensors (dtypes, shapes, devices; the kernels check every offset the
    table holds against the slabs); return the layer's ``(N, K)``."""
    if len(bank) != 8:
        raise ValueError(f"lorakern: a bank is 8 slabs (A, B^T, and codes/scales/zeros of each), got {len(bank)}")
    a, bt, qa, qas, qaz, qb, qbs, qbz = bank
    if a.dtype not in ACT_DTYPES or bt.dtype != a.dtype or a.dim() != 2 or bt.dim() != 2 or a.shape[0] != bt.shape[0]:
        raise TypeError(f"lorakern: bank A {a.dtype} {tuple(a.shape)} / B^T {bt.dtype} {tuple(bt.shape)} must be "
                        "2-D slabs of one floating dtype with the same rows")
    N, K = bt.shape[1], a.shape[1]
    for name, t in (("A codes", qa), ("B^T codes", qb)):
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise TypeError(f"lorakern: bank {name} must be a 1-D uint8 slab, got {t.dtype} {tuple(t.shape)}")
    for name, t in (("A scales", qas), ("A zeros", qaz), ("B^T scales", qbs), ("B^T zeros", qbz)):
        if t.dtype != torch.float16 or t.dim() != 2:
            raise TypeError(f"lorakern: bank {name} must be a 2-D float16 slab, got {t.dtype} {tuple(t.shape)}")
    if qas.shape != qaz.shape or qbs.shape != qbz.shape or qas.shape[0] != qbs.shape[0]:
        raise ValueError("lorakern: bank scale/zero slabs disagree on their shapes")
    if group_a or group_b:
        if group_a not in SUPPORTED_GROUP_SIZES or group_b not in SUPPORTED_GROUP_SIZES or K % group_a or N % group_b:
            raise ValueError(f"lorakern: bank groups ({group_a}, {group_b}) do not divide the layer {(N, K)}")
        if qas.shape[1] != K // group_a or qbs.shape[1] != N // group_b:
            raise ValueError("lorakern: bank scale slabs do not match the group sizes")
    if table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != 7:
        raise TypeError(f"lorakern: bank table must be int64 [S, 7], got {table.dtype} {tuple(table.shape)}")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (table.shape[0],):
        raise TypeError(f"lorakern: bank scales must be float32 [{table.shape[0]}], got {scales.dtype} "
                        f"{tuple(scales.shape)}")
    for t in (*bank, table, scales):
        if t.device != device:
            raise ValueError(f"lorakern: a bank tensor is on {t.device}, expected {device}")
    return N, K


def _check_batch(segments, tokens, weights, device) -> None:
    if segments.dtype != torch.int64 or segments.dim() != 2 or segments.shape[1] != 3:
        raise TypeError(f"lorakern: segments must be int64 [S, 3], got {segments.dtype} {tuple(segments.shape)}")
    if tokens.dtype != torch.int64 or tokens.dim() != 1:
        raise TypeError(f"lorakern: tokens must be 1-D int64, got {tokens.dtype} {tuple(tokens.shape)}")
    if weights is not None and (weights.dtype != torch.float32 or tuple(weights.shape) != tuple(tokens.shape)):
        raise TypeError(f"lorakern: weights must be float32 {tuple(tokens.shape)}, got {weights.dtype} "
                        f"{tuple(weights.shape)}")
    for t in (segments, tokens) + (() if weights is None else (weights,)):
        if t.device != device:
            raise ValueError(f"lorakern: a batch tensor is on {t.device}, expected {device}")


def check_lora_shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank):
    """Validate lora_shrink's arguments; return (N, K)."""
    if x.dtype not in ACT_DTYPES or x.dim() != 2:
        raise TypeError(f"lorakern: x must be a 2-D float32/float16/bfloat16 tensor, got {x.dtype} {tuple(x.shape)}")
    N, K = check_bank(bank, table, scales, group_a, group_b, x.device)
    if x.shape[1] != K:
        raise ValueError(f"lorakern: x has {x.shape[1]} features, the bank's layer takes K={K}")
    _check_batch(segments, tokens, weights, x.device)
    if max_rank < 0:
        raise ValueError(f"lorakern: max_rank must be >= 0, got {max_rank}")
    return N, K


def check_lora_expand(t, base, bank, table, scales, group_a, group_b, segments, tokens):
    """Validate lora_expand's arguments; return (N, K)."""
    if base.dtype not in ACT_DTYPES or base.dim() != 2:
        raise TypeError(f"lorakern: base must be a 2-D float32/float16/bfloat16 tensor, got {base.dtype}")
    N, K = check_bank(bank, table, scales, group_a, group_b, base.device)
    if base.shape[1] != N:
        raise ValueError(f"lorakern: base has {base.shape[1]} features, the bank's layer gives N={N}")
    if t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] != tokens.shape[0]:
        raise TypeError(f"lorakern: t must be float32 [E={tokens.shape[0]}, r], got {t.dtype} {tuple(t.shape)}")
    if t.device != base.device:
        raise ValueError(f"lorakern: t is on {t.device}, base on {base.device}")
    _check_batch(segments, tokens, None, base.device)
    return N, K


def check_multi_lora(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank):
    """Validate multi_lora's arguments; return (N, K)."""
    N, K = check_lora_shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    if base.dtype != x.dtype or tuple(base.shape) != (x.shape[0], N):
        raise ValueError(f"lorakern: base must be {x.dtype} {(x.shape[0], N)}, got {base.dtype} {tuple(base.shape)}")
    if base.device != x.device:
        raise ValueError(f"lorakern: base is on {base.device}, x on {x.device}")
    return N, K


def check_multi_lora_slices(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank):
    """Validate multi_lora_slices' arguments; return the slices' widths."""
    S = len(tables)
    if S == 0 or len(banks) != 8 * S or len(scales) != S or len(group_a) != S or len(group_b) != S:
        raise ValueError(f"lorakern: {S} slices need 8 bank slabs, a table, scales and group sizes each; got "
                         f"{len(banks)} slabs, {len(scales)} scales, {len(group_a)}/{len(group_b)} group sizes")
    if x.dtype not in ACT_DTYPES or x.dim() != 2:
        raise TypeError(f"lorakern: x must be a 2-D float32/float16/bfloat16 tensor, got {x.dtype} {tuple(x.shape)}")
    widths = []
    for i in range(S):
        N, K = check_bank(banks[8 * i: 8 * i + 8], tables[i], scales[i], group_a[i], group_b[i], x.device)
        if K != x.shape[1]:
            raise ValueError(f"lorakern: slice {i} takes K={K}, x has {x.shape[1]} features")
        widths.append(N)
    if base.dtype != x.dtype or tuple(base.shape) != (x.shape[0], sum(widths)) or base.device != x.device:
        raise ValueError(f"lorakern: base must be {x.dtype} {(x.shape[0], sum(widths))} on {x.device}, got "
                         f"{base.dtype} {tuple(base.shape)} on {base.device}")
    _check_batch(segments, tokens, weights, x.device)
    if max_rank < 0:
        raise ValueError(f"lorakern: max_rank must be >= 0, got {max_rank}")
    return widths


@torch.library.register_fake("lorakern::lora_shrink")
def _lora_shrink_fake(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank, max_count=-1):
    check_lora_shrink(x, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank)
    return x.new_empty((tokens.shape[0], max_rank), dtype=torch.float32)


@torch.library.register_fake("lorakern::quant_matmul_lora")
def _quant_matmul_lora_fake(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a,
                            group_b, scale):
    N, _ = check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi,
                                   group_a, group_b, scale)
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("lorakern::gwq_matmul")
def _gwq_matmul_fake(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias=None):
    N, _ = check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("lorakern::quant_matmul_grad_input")
def _quant_matmul_grad_input_fake(grad, qweight, scales, zeros, bits, group_size):
    _, K = check_grad_input(grad, qweight, scales, zeros, bits, group_size)
    return grad.new_empty((*grad.shape[:-1], K))


@torch.library.register_fake("lorakern::gwq_matmul_grad_input")
def _gwq_matmul_grad_input_fake(grad, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values):
    N, K = check_grad_input(grad, qweight, scales, zeros, bits, group_size)
    check_outliers(row_ptr, col_idx, values, N, K, qweight.device)
    return grad.new_empty((*grad.shape[:-1], K))


@torch.library.register_fake("lorakern::quant_matmul_qalora")
def _quant_matmul_qalora_fake(x, qweight, scales, zeros, bits, group_size, bias, A, Bt, scale):
    N, _, _ = check_quant_matmul_qalora(x, qweight, scales, zeros, bits, group_size, bias, A, Bt, scale)
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("lorakern::quant_matmul")
def _quant_matmul_fake(x, qweight, scales, zeros, bits, group_size, bias=None):
    N, _ = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("lorakern::dequantize")
def _dequantize_fake(qweight, scales, zeros, bits, group_size):
    N, K = check_qweight(qweight, scales, zeros, bits, group_size)
    return qweight.new_empty((N, K), dtype=torch.float32)


def _register_base_shaped_fake(op: str, check, nchecked: int) -> None:
    """The fake of an op that returns a new tensor shaped like its second argument (``base``): the op's
    checks on its first ``nchecked`` arguments (the rest are GPU launch hints), then ``empty_like(base)``."""
    names = [a.name for a in getattr(torch.ops.lorakern, op).default._schema.arguments]

    def fake(*args, **kwargs):
        vals = list(args) + [kwargs[n] for n in names[len(args):nchecked]]
        check(*vals[:nchecked])
        return torch.empty_like(vals[1])
    fake.__name__ = f"_{op}_fake"
    torch.library.register_fake(f"lorakern::{op}")(fake)


for _op, _check, _n in (("multi_lora_slices", check_multi_lora_slices, 11), ("lora_expand", check_lora_expand, 9),
                        ("multi_lora", check_multi_lora, 11), ("lora_mixed", check_lora_mixed, 7)):
    _register_base_shaped_fake(_op, _check, _n)
