"""CPU kernels (every ISA path) against the references, on fresh random inputs."""
import pytest
import torch

import lorakern
from lorakern._native import native
from lorakern.formats.packing import unpack_codes
from lorakern.ops import reference as ref
from lorakern import testing as oracle

from lorakern.testing import EPS, int8_act_bound, random_qweight, terms_bound

def check_against_references(x, w, bias, y):
    N, K = w.shape
    ng = K // w.group_size
    model = oracle.quant_matmul_int8_act(x, w.qweight, w.scales, w.zeros, w.bits, w.group_size, bias).reshape(-1, N)
    y2 = y.reshape(-1, N).double()
    assert torch.isfinite(y2).all()
    # 1) exact model of the kernel math: only fp32 summation and output rounding differ
    nterms = K // min(w.group_size, 64) + ng + 8  # sequential fp32 additions, lane sums, product roundings
    tol = nterms * EPS[torch.float32] * terms_bound(x, w, bias).double() + EPS[y.dtype] * model.abs()
    err = (y2 - model).abs()
    assert (err <= tol + 1e-30).all(), f"max err vs int8 model {err.max():.3g}, tol {tol.min():.3g}"
    # 2) fp32 reference: plus the proven int8 activation rounding bound
    full = ref.quant_matmul(x.float(), w.qweight, w.scales, w.zeros, w.bits, w.group_size, bias).reshape(-1, N).double()
    tol2 = tol + int8_act_bound(x, w).double()
    assert ((y2 - full).abs() <= tol2 + 1e-30).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quant_matmul_cpu_matches_reference(isa, bits, G, dtype, rng):
    # M >= 4: the blocked GEMM (8-row panels: N = 5 one partial panel, N = 203 several and a partial one; M = 70
    # crosses its 64-row blocks and ends in a partial 4-row tile); 9 and 19 groups: the scale conversion's 8- and
    # 16-wide steps and their tails (SmolLM2's K = 576 in groups of 64 has 9), 150 rows: its 16-row blocks (each
    # thread's rows, up to 8 threads)
    for M, N, groups in [(1, 37, 3), (7, 129, 1), (33, 5, 2), (70, 203, 2), (1, 11, 9), (2, 150, 19)]:
        K = G * groups
        w = random_qweight(N, K, bits, G, rng)
        x = (torch.randn(M, K, generator=rng) * 2).to(dtype)
        bias = torch.randn(N, generator=rng) if M != 7 else None
        y = torch.ops.lorakern.quant_matmul(x, w.qweight, w.scales, w.zeros, bits, G, bias)
        assert y.dtype == dtype and y.shape == (M, N)
        check_against_references(x, w, bias, y)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_blocked_gemm_chunks_and_tails(isa, bits, G, rng):
    """The blocked GEMMs at sizes the small cases miss: N = 1000 rows of K = 1536 (SmolLM2's down_proj width) span
    several chunks of packed panels (AMX: 256 KB of 16-row panels, AVX2: 128 KB of 8-row ones) and end in a partial
    panel; M = 8 (the AMX GEMM's smallest), 37 and 83 rows end in partial 16-row tiles (83 also in a partial 64-row
    block); groups of 32 (the AMX tiles' half-width blocks), 64 and 128 (two blocks a group); bias on two sizes. Poisoned output, every element checked against the references."""
    K, N = 1536, 1000
    w = random_qweight(N, K, bits, G, rng)
    for M in (8, 37, 83):
        x = torch.randn(M, K, generator=rng) * 2
        bias = torch.randn(N, generator=rng) if M != 37 else None
        y = torch.full((M, N), float("nan"))
        native().quant_matmul(x.data_ptr(), 0, M, w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(),
                              N, K, bits, G, bias.data_ptr() if bias is not None else 0, y.data_ptr(), 2)
        check_against_references(x, w, bias, y)


def test_leading_dims_and_empty(isa):
    w = random_qweight(11, 64, 4, 32)
    x = torch.randn(2, 3, 64)
    y = torch.ops.lorakern.quant_matmul(x, w.qweight, w.scales, w.zeros, 4, 32)
    assert y.shape == (2, 3, 11)
    check_against_references(x, w, None, y)
    e = torch.ops.lorakern.quant_matmul(torch.randn(0, 64), w.qweight, w.scales, w.zeros, 4, 32)
    assert e.shape == (0, 11)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_every_output_element_written(isa, bits):
    """Poison the output buffer with NaN and call the kernel directly."""
    for G, M in ((32, 5), (64, 5), (128, 5), (32, 21), (128, 21)):  # M = 21: the blocked GEMM
        N, K = 67, 3 * G
        w = random_qweight(N, K, bits, G)
        x = torch.randn(M, K)
        y = torch.full((M, N), float("nan"))
        native().quant_matmul(x.data_ptr(), 0, M, w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(),
                              N, K, bits, G, 0, y.data_ptr(), 2)
        assert torch.isfinite(y).all()
        check_against_references(x, w, None, y)


def test_isa_paths_agree(rng):
    """All ISA paths compute the same integers: results agree to fp32 rounding."""
    w = random_qweight(301, 384, 4, 128, rng)
    x = torch.randn(9, 384, generator=rng)
    outs = {}
    before = lorakern.active_isa()
    try:
        for name in lorakern.available_isas():
            lorakern.set_isa(name)
            outs[name] = torch.ops.lorakern.quant_matmul(x, w.qweight, w.scales, w.zeros, 4, 128)
    finally:
        lorakern.set_isa(before)
    base = outs["generic"]
    for name, y in outs.items():
        torch.testing.assert_close(y, base, rtol=1e-5, atol=1e-4, msg=f"{name} vs generic")


def test_nan_activations_propagate(isa):
    w = random_qweight(8, 64, 4, 32)
    x = torch.randn(2, 64)
    x[0, 3] = float("nan")
    y = torch.ops.lorakern.quant_matmul(x, w.qweight, w.scales, w.zeros, 4, 32)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


def test_dequantize_cpu_matches_reference(isa):
    for bits in (1, 2, 3, 4, 8):
        for G in (32, 64, 128):
            w = random_qweight(19, 2 * G, bits, G)
            d = torch.ops.lorakern.dequantize(w.qweight, w.scales, w.zeros, bits, G)
            assert torch.equal(d, ref.dequantize(w.qweight, w.scales, w.zeros, bits, G))


def test_opcheck():
    w = random_qweight(13, 128, 3, 64)
    x = torch.randn(3, 128)
    torch.library.opcheck(torch.ops.lorakern.quant_matmul.default,
                          (x, w.qweight, w.scales, w.zeros, 3, 64, torch.randn(13)))
    torch.library.opcheck(torch.ops.lorakern.quant_matmul.default,
                          (x.bfloat16(), w.qweight, w.scales, w.zeros, 3, 64, None))
    torch.library.opcheck(torch.ops.lorakern.dequantize.default, (w.qweight, w.scales, w.zeros, 3, 64))


def test_torch_compile_fullgraph():
    lin = torch.nn.Linear(128, 24)
    ql = lorakern.QuantLinear.from_linear(lin, 4, 64)

    def f(x):
        return torch.relu(ql(x)) * 2

    x = torch.randn(4, 128)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(compiled(torch.randn(7, 128)).shape, torch.Size([7, 24]))
