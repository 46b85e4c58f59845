"""gwq_matmul (dense low-bit + CSR outliers) on every CPU ISA path and in the
Triton interpreter, against the references; damaged CSR data is refused."""
import pytest
import torch

import lorakern
from lorakern._native import native
from lorakern.formats import GWQWeight, SparseOutliers
from lorakern.ops import reference as ref
from lorakern import testing as oracle
from lorakern.triton.gwq_matmul import gwq_matmul_triton

from lorakern.testing import OUTLIER_PATTERNS, fp_bound, int8_act_bound, outlier_terms, random_outliers, random_qweight
from lorakern.testing import EPS, terms_bound
from lorakern.testing import DOT_EPS, interpreter_bf16_dot_xfail
INTERPRETER_BF16_DOT = interpreter_bf16_dot_xfail()


def check_gwq(x, w, o, bias, y):
    N, K = w.shape
    args = (w.qweight, w.scales, w.zeros, w.bits, w.group_size, o.row_ptr, o.col_idx, o.values)
    model = oracle.gwq_matmul_int8_act(x, *args, bias).reshape(-1, N)
    y2 = y.reshape(-1, N).double()
    assert torch.isfinite(y2).all()
    sparse_terms, longest = outlier_terms(x, o)
    nterms = K // min(w.group_size, 64) + K // w.group_size + 8 + longest
    tol = (nterms * EPS[torch.float32] * (terms_bound(x, w, bias) + sparse_terms).double()
           + EPS[y.dtype] * model.abs())
    err = (y2 - model).abs()
    assert (err <= tol + 1e-30).all(), f"max err vs exact model {err.max():.3g}"
    # the fp32 reference, plus the proven int8 activation rounding of the dense part
    full = ref.gwq_matmul(x.float(), *args, bias).reshape(-1, N).double()
    assert ((y2 - full).abs() <= tol + int8_act_bound(x, w).double() + 1e-30).all()


@pytest.mark.parametrize("pattern", OUTLIER_PATTERNS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gwq_cpu_matches_reference(isa, pattern, bits, dtype, rng):
    # (M = 1, N = 300: decode sums the outliers of 128 rows at a time; the blocks' edges fall inside)
    for M, N, G, groups in [(1, 37, 128, 3), (1, 300, 64, 3), (7, 129, 64, 1), (16, 5, 32, 2), (33, 23, 128, 1)]:
        K = G * groups
        w = random_qweight(N, K, bits, G, rng)
        o = random_outliers(N, K, pattern, rng)
        x = (torch.randn(M, K, generator=rng) * 2).to(dtype)
        bias = torch.randn(N, generator=rng) if M != 7 else None
        y = torch.ops.lorakern.gwq_matmul(x, w.qweight, w.scales, w.zeros, bits, G, o.row_ptr, o.col_idx,
                                          o.values, bias)
        assert y.dtype == dtype and y.shape == (M, N)
        check_gwq(x, w, o, bias, y)


@pytest.mark.parametrize("M", [1, 4, 17])
def test_gwq_every_output_written(isa, M):
    """Poison the output with NaN and call the kernel directly."""
    N, K, G = 67, 256, 128
    w = random_qweight(N, K, 4, G)
    o = random_outliers(N, K, "1pct")
    x = torch.randn(M, K)
    y = torch.full((M, N), float("nan"))
    native().gwq_matmul(x.data_ptr(), 0, M, w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(), N, K, 4,
                        G, 0, o.row_ptr.data_ptr(), o.col_idx.data_ptr(), o.values.data_ptr(), o.nnz, y.data_ptr(), 2)
    check_gwq(x, w, o, None, y)


def test_gwq_without_outliers_equals_quant_matmul(isa, rng):
    w = random_qweight(45, 256, 4, 128, rng)
    o = SparseOutliers.empty(45, 256)
    x = torch.randn(3, 256, generator=rng)
    y = torch.ops.lorakern.gwq_matmul(x, w.qweight, w.scales, w.zeros, 4, 128, o.row_ptr, o.col_idx, o.values)
    assert torch.equal(y, torch.ops.lorakern.quant_matmul(x, w.qweight, w.scales, w.zeros, 4, 128))


@pytest.mark.parametrize("pattern", OUTLIER_PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=INTERPRETER_BF16_DOT),
                                   torch.float32])
def test_gwq_triton_matches_reference(pattern, dtype, rng):
    for bits, G in ((4, 128), (3, 64), (2, 32)):
        M, N, K = 5, 67, 2 * G
        w = random_qweight(N, K, bits, G, rng)
        o = random_outliers(N, K, pattern, rng)
        x = torch.randn(M, K, generator=rng).to(dtype)
        bias = torch.randn(N, generator=rng)
        y = gwq_matmul_triton(x, w.qweight, w.scales, w.zeros, bits, G, o.row_ptr, o.col_idx, o.values, bias)
        assert y.dtype == dtype and y.shape == (M, N)
        expect = ref.gwq_matmul(x, w.qweight, w.scales, w.zeros, bits, G, o.row_ptr, o.col_idx, o.values,
                                bias).float()
        sparse_terms, longest = outlier_terms(x, o)
        tol = (fp_bound(x, w, 2 * DOT_EPS[dtype]) + (longest + 2) * 2.0**-23 * sparse_terms
               + DOT_EPS[dtype] * expect.abs() + 1e-5)
        assert ((y.float() - expect).abs() <= tol).all()


def test_gwq_triton_damaged_csr_reads_nothing_out_of_bounds():
    """Out-of-range row pointers and columns are masked in the Triton kernel (the
    interpreter raises on an out-of-bounds access)."""
    w = random_qweight(8, 128, 4, 128)
    o = random_outliers(8, 128, "5pct")
    rp = o.row_ptr.clone()
    rp[3] = 10_000
    ci = o.col_idx.clone()
    if ci.numel():
        ci[0] = 60_000
    y = gwq_matmul_triton(torch.randn(2, 128, dtype=torch.float16), w.qweight, w.scales, w.zeros, 4, 128, rp, ci,
                          o.values)
    assert y.shape == (2, 8)


def test_gwq_opcheck():
    w = random_qweight(13, 128, 3, 64)
    o = random_outliers(13, 128, "5pct")
    x = torch.randn(3, 128)
    args = (w.qweight, w.scales, w.zeros, 3, 64, o.row_ptr, o.col_idx, o.values)
    torch.library.opcheck(torch.ops.lorakern.gwq_matmul.default, (x, *args, torch.randn(13)))
    torch.library.opcheck(torch.ops.lorakern.gwq_matmul.default, (x.half(), *args, None))


def test_gwq_torch_compile_fullgraph():
    w = random_qweight(24, 128, 4, 64)
    o = random_outliers(24, 128, "1pct")

    def f(x):
        return torch.relu(lorakern.ops.gwq_matmul(x, w.qweight, w.scales, w.zeros, 4, 64, o.row_ptr, o.col_idx,
                                                  o.values)) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    x = torch.randn(4, 128)
    torch.testing.assert_close(compiled(x), f(x))


def damaged(o: SparseOutliers, what: str):
    rp, ci, v = o.row_ptr.clone(), o.col_idx.clone(), o.values.clone()
    if what == "col_out_of_range":
        ci[0] = 200
    elif what == "row_ptr_decreasing":
        a, b = int(rp[2]), int(rp[3])
        rp[2], rp[3] = b + 1, a  # row 2 now ends before it starts
    elif what == "row_ptr_past_nnz":
        rp[-1] = v.numel() + 5
    elif what == "row_ptr_start":
        rp[0] = 1
    return rp, ci, v


@pytest.mark.parametrize("what", ["col_out_of_range", "row_ptr_decreasing", "row_ptr_past_nnz", "row_ptr_start"])
def test_gwq_cpu_rejects_damaged_csr(isa, what):
    w = random_qweight(8, 128, 4, 128)
    o = random_outliers(8, 128, "5pct")
    rp, ci, v = damaged(o, what)
    for M in (1, 3):
        with pytest.raises(ValueError, match="outlier CSR is inconsistent"):
            torch.ops.lorakern.gwq_matmul(torch.randn(M, 128), w.qweight, w.scales, w.zeros, 4, 128, rp, ci, v)
    with pytest.raises(ValueError):
        SparseOutliers(rp, ci, v, (8, 128))


@pytest.mark.parametrize("pos", [3, 7, 8, 24, 25, 45])
def test_gwq_cpu_decode_rejects_decreasing_row_ptr_anywhere(isa, pos):
    # At M = 1 the row sums are read 8 rows at a time from clamped pointers: a pointer that decreases inside
    # [0, nnz] must be caught inside a step, across two steps and in the scalar rest (50 rows on 2 threads: 25
    # each, whatever this machine's default)
    w = random_qweight(50, 128, 4, 128)
    o = random_outliers(50, 128, "5pct")
    x = torch.randn(1, 128)
    args = (w.qweight, w.scales, w.zeros, 4, 128)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ok = torch.ops.lorakern.gwq_matmul(x, *args, o.row_ptr, o.col_idx, o.values)
        check_gwq(x, w, o, None, ok)
        rp = o.row_ptr.clone()
        rp[pos] = rp[pos + 1] + 1
        assert rp[pos] <= o.nnz
        with pytest.raises(ValueError, match="outlier CSR is inconsistent"):
            torch.ops.lorakern.gwq_matmul(x, *args, rp, o.col_idx, o.values)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bump", [33, 40, 63])
def test_gwq_cpu_decode_rejects_bump_in_chunk_without_outliers(isa, bump):
    # At M = 1 a chunk of 32 rows whose first and last pointers are equal is skipped after checking that every
    # pointer between equals them: a pointer that rises and falls back inside it must be refused (one thread:
    # chunks start at rows 0, 32, 64)
    w = random_qweight(80, 128, 4, 128)
    counts = torch.zeros(80, dtype=torch.int32)
    counts[:6] = 3
    counts[70:] = 2
    rp = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)])
    nnz = int(rp[-1])
    ci = torch.cat([torch.randperm(128)[:int(c)].sort().values for c in counts]).to(torch.int32).to(torch.uint16)
    v = torch.randn(nnz).to(torch.float16)
    x = torch.randn(1, 128)
    args = (w.qweight, w.scales, w.zeros, 4, 128)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ok = torch.ops.lorakern.gwq_matmul(x, *args, rp, ci, v)
        check_gwq(x, w, SparseOutliers(rp, ci, v, (80, 128)), None, ok)
        bad = rp.clone()
        bad[bump] += 1
        with pytest.raises(ValueError, match="outlier CSR is inconsistent"):
            torch.ops.lorakern.gwq_matmul(x, *args, bad, ci, v)
    finally:
        torch.set_num_threads(threads)


def test_outlier_validation_messages():
    o = random_outliers(6, 64, "5pct")
    with pytest.raises(TypeError, match="int32"):
        SparseOutliers(o.row_ptr.long(), o.col_idx, o.values, (6, 64))
    with pytest.raises(TypeError, match="uint16"):
        SparseOutliers(o.row_ptr, o.col_idx.to(torch.int32), o.values, (6, 64))
    with pytest.raises(TypeError, match="float16"):
        SparseOutliers(o.row_ptr, o.col_idx, o.values.float(), (6, 64))
    full = random_outliers(6, 64, "full_row")
    ci = full.col_idx.clone()
    c1, c2 = int(ci[1]), int(ci[2])
    ci[1], ci[2] = c2, c1
    with pytest.raises(ValueError, match="strictly increasing"):
        SparseOutliers(full.row_ptr, ci, full.values, (6, 64))
    v = full.values.clone()
    v[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SparseOutliers(full.row_ptr, full.col_idx, v, (6, 64))
    with pytest.raises(ValueError, match="65536"):
        SparseOutliers.empty(2, 65536 + 128)
    w = random_qweight(6, 64, 4, 32)
    with pytest.raises(ValueError, match="outliers are"):
        GWQWeight(w, SparseOutliers.empty(6, 128))
    with pytest.raises(TypeError, match="row_ptr"):
        torch.ops.lorakern.gwq_matmul(torch.randn(1, 64), w.qweight, w.scales, w.zeros, 4, 32,
                                      o.row_ptr[:-1], o.col_idx, o.values)


def test_gwq_weight_roundtrip(tmp_path):
    w = GWQWeight(random_qweight(9, 256, 3, 128), random_outliers(9, 256, "5pct"))
    lorakern.save_quantized(tmp_path / "g.safetensors", {"layer": w})
    back, _, _ = lorakern.load_quantized(tmp_path / "g.safetensors")
    b = back["layer"]
    assert isinstance(b, GWQWeight)
    for a, c in ((w.dense.qweight, b.dense.qweight), (w.outliers.row_ptr, b.outliers.row_ptr),
                 (w.outliers.col_idx.int(), b.outliers.col_idx.int()), (w.outliers.values, b.outliers.values)):
        assert torch.equal(a, c)
    assert torch.equal(w.dequantize(), b.dequantize())


def test_damaged_gwq_files_are_rejected(tmp_path):
    """A GWQ safetensors file whose CSR or outlier metadata is wrong gives FormatError on load."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lorakern.formats import FormatError
    w = GWQWeight(random_qweight(9, 256, 4, 128), random_outliers(9, 256, "5pct"))
    good = tmp_path / "g.safetensors"
    lorakern.save_quantized(good, {"layer": w})
    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())

    def write(name, t=None, m=None):
        p = tmp_path / name
        save_file({**tensors, **(t or {})}, str(p), metadata={**meta, **(m or {})})
        return p
    rp = tensors["layer.row_ptr"].clone()
    rp[4] = rp[5] + 1  # decreasing row pointers
    ci = tensors["layer.col_idx"].to(torch.int32)
    ci[0] = 300  # column past K
    cases = {
        "row_ptr": (write("rp.safetensors", {"layer.row_ptr": rp}), "invalid outliers"),
        "col": (write("col.safetensors", {"layer.col_idx": ci.to(torch.uint16)}), "invalid outliers"),
        "nnz": (write("nnz.safetensors", m={"layer.nnz": str(w.outliers.nnz + 1)}), "outliers, tensors hold"),
        "kind": (write("kind.safetensors", m={"layer.outliers": "coo"}), "unknown outlier format"),
    }
    for name, (path, msg) in cases.items():
        with pytest.raises(FormatError, match=msg):
            lorakern.load_quantized(path)
    missing = dict(tensors)
    del missing["layer.values"]
    p = tmp_path / "missing.safetensors"
    save_file(missing, str(p), metadata=meta)
    with pytest.raises(FormatError, match="missing"):
        lorakern.load_quantized(p)
    assert json.loads(meta["weights"]) == ["layer"]
