"""Gradients through the quantized ops (quant_matmul / gwq_matmul autograd, the *_grad_input kernels) and the
fused unmerged QA-LoRA op, on every ISA path, every dtype, and Triton in the interpreter."""
import pytest
import torch

import lorakern
from lorakern import ops
from lorakern._native import native
from lorakern.ops import reference as ref
from lorakern.testing import EPS, DOT_EPS, interpreter_bf16_dot_xfail, quantize_activations_int8, random_outliers, random_qweight

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _grad_tol(g, w_abs, dtype):
    """fp32 accumulation over N terms (bounded by N * eps32 * |g| @ |W|) plus the output's rounding."""
    N = g.shape[-1]
    terms = g.reshape(-1, N).double().abs() @ w_abs.double()
    return (N + 8) * EPS[torch.float32] * terms + EPS[dtype] * terms + 1e-30


def _exact_grad(g, w, outliers=None):
    return g.reshape(-1, g.shape[-1]).double() @ ref.dense_weight(w.qweight, w.scales, w.zeros, w.bits,
                                                                     w.group_size, outliers, torch.float64)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_kernel_matches_exact(isa, bits, G, dtype, rng):
    for M, N in ((1, 130), (2, 37), (7, 257)):  # decode paths (M <= 2), row chunks of 128 crossed
        w = random_qweight(N, 3 * G, bits, G, rng)
        g = torch.randn(M, N, generator=rng).to(dtype)
        dx = torch.ops.lorakern.quant_matmul_grad_input(g, w.qweight, w.scales, w.zeros, bits, G)
        assert dx.dtype == dtype and dx.shape == (M, 3 * G)
        exact = _exact_grad(g, w)
        tol = _grad_tol(g, w.dequantize().abs(), dtype)
        err = (dx.double() - exact).abs()
        assert (err <= tol).all(), f"max err {err.max():.3g}"


def test_grad_input_poisoned_output_is_overwritten(isa, rng):
    w = random_qweight(131, 192, 4, 64, rng)
    g = torch.randn(5, 131, generator=rng)
    dx = torch.full((5, 192), float("nan"))
    native().quant_matmul_grad_input(g.data_ptr(), 0, 5, w.qweight.data_ptr(), w.scales.data_ptr(),
                                     w.zeros.data_ptr(), 131, 192, 4, 64, 0, 0, 0, 0, dx.data_ptr(), 2)
    assert torch.isfinite(dx).all()
    assert torch.allclose(dx.double(), _exact_grad(g, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("pattern", ["one_per_row", "5pct", "full_row"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gwq_grad_input_matches_exact(isa, pattern, dtype, rng):
    w = random_qweight(133, 128, 3, 64, rng)
    o = random_outliers(133, 128, pattern, rng)
    g = torch.randn(6, 133, generator=rng).to(dtype)
    dx = torch.ops.lorakern.gwq_matmul_grad_input(g, w.qweight, w.scales, w.zeros, 3, 64, o.row_ptr, o.col_idx,
                                                  o.values)
    csr = (o.row_ptr, o.col_idx, o.values)
    exact = _exact_grad(g, w, csr)
    w_abs = w.dequantize().abs() + ref.outliers_dense(*csr, 133, 128).abs()
    assert ((dx.double() - exact).abs() <= 2 * _grad_tol(g, w_abs, dtype)).all()


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_tiled_gemm_path(outliers, dtype, rng):
    """From GRAD_GEMM_MIN_ROWS rows on, W is dequantized in row tiles and multiplied with torch's GEMM: the same
    gradient (N = 300 crosses the 256-row tiles)."""
    from lorakern.ops.cpu import GRAD_GEMM_MIN_ROWS
    w = random_qweight(300, 128, 4, 32, rng)
    csr = None
    if outliers:
        o = random_outliers(300, 128, "5pct", rng)
        csr = (o.row_ptr, o.col_idx, o.values)
    g = torch.randn(GRAD_GEMM_MIN_ROWS + 7, 300, generator=rng).to(dtype)
    op = torch.ops.lorakern.gwq_matmul_grad_input if outliers else torch.ops.lorakern.quant_matmul_grad_input
    dx = op(g, w.qweight, w.scales, w.zeros, 4, 32, *(csr or ()))
    assert dx.dtype == dtype and dx.shape == (GRAD_GEMM_MIN_ROWS + 7, 128)
    w_abs = w.dequantize().abs() + (ref.outliers_dense(*csr, 300, 128).abs() if csr else 0)
    assert ((dx.double() - _exact_grad(g, w, csr)).abs() <= 2 * _grad_tol(g, w_abs, dtype)).all()
    if outliers:
        bad = o.col_idx.clone()
        bad[5] = 128
        with pytest.raises(ValueError, match="CSR"):
            op(g, w.qweight, w.scales, w.zeros, 4, 32, o.row_ptr, bad, o.values)


def test_gwq_grad_input_refuses_a_damaged_csr(rng):
    w = random_qweight(8, 64, 4, 64, rng)
    o = random_outliers(8, 64, "one_per_row", rng)
    bad_cols = o.col_idx.clone()
    bad_cols[0] = 64  # column out of range
    g = torch.randn(2, 8, generator=rng)
    with pytest.raises(ValueError, match="CSR"):
        torch.ops.lorakern.gwq_matmul_grad_input(g, w.qweight, w.scales, w.zeros, 4, 64, o.row_ptr, bad_cols,
                                                 o.values)
    bad_rp = o.row_ptr.clone()
    bad_rp[3] = bad_rp[4] + 1  # decreasing
    with pytest.raises(ValueError, match="CSR"):
        torch.ops.lorakern.gwq_matmul_grad_input(g, w.qweight, w.scales, w.zeros, 4, 64, bad_rp, o.col_idx, o.values)


def test_grad_input_bad_arguments(rng):
    w = random_qweight(8, 64, 4, 64, rng)
    with pytest.raises(ValueError, match="last dimension N=8"):
        torch.ops.lorakern.quant_matmul_grad_input(torch.randn(2, 7), w.qweight, w.scales, w.zeros, 4, 64)
    with pytest.raises(TypeError, match="grad must be"):
        torch.ops.lorakern.quant_matmul_grad_input(torch.randn(2, 8).double(), w.qweight, w.scales, w.zeros, 4, 64)


class _ExactQuantMatmul(torch.autograd.Function):
    """The reference's forward and backward in fp64: ``x @ W^T`` and ``grad @ W`` of the exact weight."""

    @staticmethod
    def forward(ctx, x, w64):
        ctx.save_for_backward(w64)
        return x @ w64.t()

    @staticmethod
    def backward(ctx, grad):
        (w64,) = ctx.saved_tensors
        return grad @ w64, None


@pytest.mark.parametrize("outliers", [False, True])
def test_gradcheck_fp64_reference(outliers, rng):
    w = random_qweight(9, 64, 3, 32, rng)
    csr = None
    if outliers:
        o = random_outliers(9, 64, "5pct", rng)
        csr = (o.row_ptr, o.col_idx, o.values)
    w64 = ref.dense_weight(w.qweight, w.scales, w.zeros, 3, 32, csr, torch.float64)
    x = torch.randn(4, 64, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _ExactQuantMatmul.apply(t, w64), (x,))
    # the formula the ops register (grad_input op, reference backend) is that backward
    g = torch.randn(4, 9, generator=rng)
    fn = ref.gwq_matmul_grad_input if outliers else ref.quant_matmul_grad_input
    got = fn(g, w.qweight, w.scales, w.zeros, 3, 32, *(csr or ()))
    assert torch.allclose(got.double(), g.double() @ w64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_through_the_ops(isa, outliers, dtype, rng):
    """x.grad and bias.grad from backward through the registered op equal the grad_input kernel and sum(dy)."""
    w = random_qweight(70, 128, 4, 32, rng)
    o = random_outliers(70, 128, "1pct", rng) if outliers else None
    x = torch.randn(2, 3, 128, generator=rng).to(dtype).requires_grad_()
    bias = torch.randn(70, generator=rng).requires_grad_()
    csr = (o.row_ptr, o.col_idx, o.values) if outliers else ()
    y = (ops.gwq_matmul if outliers else ops.quant_matmul)(x, w.qweight, w.scales, w.zeros, 4, 32, *csr, bias)
    g = torch.randn(y.shape, generator=rng).to(dtype)
    y.backward(g)
    op = torch.ops.lorakern.gwq_matmul_grad_input if outliers else torch.ops.lorakern.quant_matmul_grad_input
    assert x.grad.dtype == dtype and torch.equal(x.grad, op(g, w.qweight, w.scales, w.zeros, 4, 32, *csr))
    assert torch.allclose(bias.grad, g.float().sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_eager_fast_path_keeps_autograd(rng):
    """Plain CPU tensors take the dispatcher-free path only when no gradient is needed."""
    w = random_qweight(16, 64, 4, 64, rng)
    x = torch.randn(3, 64, generator=rng, requires_grad=True)
    y = ops.quant_matmul(x, w.qweight, w.scales, w.zeros, 4, 64)
    assert y.requires_grad and y.grad_fn is not None
    with torch.no_grad():
        assert not ops.quant_matmul(x, w.qweight, w.scales, w.zeros, 4, 64).requires_grad


@pytest.mark.parametrize("outliers", [False, True])
def test_opcheck_autograd_registration(outliers, rng):
    w = random_qweight(24, 64, 4, 32, rng)
    x = torch.randn(3, 64, generator=rng, requires_grad=True)
    bias = torch.randn(24, generator=rng)
    if outliers:
        o = random_outliers(24, 64, "5pct", rng)
        args = (x, w.qweight, w.scales, w.zeros, 4, 32, o.row_ptr, o.col_idx, o.values, bias)
        op = torch.ops.lorakern.gwq_matmul.default
    else:
        args = (x, w.qweight, w.scales, w.zeros, 4, 32, bias)
        op = torch.ops.lorakern.quant_matmul.default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_training_gradient_under_compile(rng):
    w = random_qweight(24, 64, 4, 32, rng)
    A = torch.randn(4, 64, generator=rng, requires_grad=True)

    def loss(a):
        return ops.quant_matmul(torch.tanh(a), w.qweight, w.scales, w.zeros, 4, 32).square().sum()
    loss(A).backward()
    eager = A.grad.clone()
    A.grad = None
    torch.compile(loss, fullgraph=True, backend="aot_eager")(A).backward()
    assert torch.allclose(A.grad, eager, rtol=1e-5, atol=1e-5)


# ---- the fused unmerged QA-LoRA op ----

def _qalora_case(rng, N=70, G=64, ng=3, r=5, bits=4, dtype=torch.float32, M=4):
    w = random_qweight(N, ng * G, bits, G, rng)
    x = torch.randn(M, ng * G, generator=rng).to(dtype)
    A = torch.randn(r, ng, generator=rng)
    Bt = torch.randn(r, N, generator=rng) * 0.1
    bias = torch.randn(N, generator=rng)
    return w, x, A, Bt, bias


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qalora_cpu_matches_int8_model(isa, bits, G, dtype, rng):
    """The kernel pools the int8-quantized activations the base sees: equal to that exact model up to fp32
    rounding, and to the exact-input reference within the int8 activation bound."""
    for M, r in ((1, 16), (3, 5), (9, 1)):
        w, x, A, Bt, bias = _qalora_case(rng, N=67, G=G, r=r, bits=bits, dtype=dtype, M=M)
        y = ops.quant_matmul_qalora(x, w.qweight, w.scales, w.zeros, bits, G, bias, A, Bt, 1.75)
        assert y.dtype == dtype and y.shape == (M, 67)
        xhat = quantize_activations_int8(x, G).double()
        wd = w.dequantize().double()
        model = xhat @ wd.t() + bias.double() + 1.75 * (ref.qalora_pool(xhat, G) @ A.double().t()) @ Bt.double()
        terms = xhat.abs() @ (w.scales.double().abs().repeat_interleave(G, 1) * (2 ** bits + w.zeros.double().abs().repeat_interleave(G, 1))).t()
        terms = terms + bias.double().abs() + 1.75 * (ref.qalora_pool(xhat.abs(), G) @ A.double().abs().t()) @ Bt.double().abs()
        tol = (3 * G + 64) * EPS[torch.float32] * terms + EPS[dtype] * model.abs() + 1e-30
        err = (y.double() - model).abs()
        assert (err <= tol).all(), f"max err {err.max():.3g} tol {tol.min():.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=interpreter_bf16_dot_xfail()),
                                   torch.float32])
@pytest.mark.parametrize("r", [1, 16, 20])
def test_qalora_triton_matches_reference(dtype, r, rng):
    from lorakern.triton.quant_matmul import quant_matmul_qalora_triton
    w, x, A, Bt, bias = _qalora_case(rng, N=67, G=64, r=r, dtype=dtype, M=5)
    y = quant_matmul_qalora_triton(x, w.qweight, w.scales, w.zeros, 4, 64, bias, A, Bt, 0.5)
    expect = ref.quant_matmul_qalora(x, w.qweight, w.scales, w.zeros, 4, 64, bias, A, Bt, 0.5).double()
    base_terms = x.double().abs() @ w.dequantize().double().abs().t()
    ad_terms = 0.5 * (ref.qalora_pool(x.double().abs(), 64) @ A.double().abs().t()) @ Bt.double().abs()
    tol = 4 * DOT_EPS[dtype] * (base_terms + ad_terms) + DOT_EPS[dtype] * expect.abs() + 1e-5
    assert ((y.double() - expect).abs() <= tol).all()


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_grad_input_triton_matches_exact(outliers, dtype, rng):
    from lorakern.triton.grad_input import CONFIGS, grad_input_triton
    for config, M in (("small", 3), ("medium", 37), ("large", 70)):
        w = random_qweight(75, 128, 3, 64, rng)
        csr = None
        if outliers:
            o = random_outliers(75, 128, "5pct", rng)
            csr = (o.row_ptr, o.col_idx, o.values)
        g = torch.randn(M, 75, generator=rng).to(dtype)
        dx = grad_input_triton(g, w.qweight, w.scales, w.zeros, 3, 64, csr, config=config)
        assert dx.dtype == dtype and dx.shape == (M, 128)
        exact = _exact_grad(g, w, csr)
        w_abs = w.dequantize().abs() + (ref.outliers_dense(*csr, 75, 128).abs() if csr else 0)
        terms = g.double().abs() @ w_abs.double()
        assert ((dx.double() - exact).abs() <= 4 * DOT_EPS[dtype] * terms + 1e-5).all(), config
    assert set(CONFIGS) == {"small", "medium", "large"}


def test_qalora_bad_arguments(rng):
    w, x, A, Bt, bias = _qalora_case(rng)
    with pytest.raises(ValueError, match="one per quantization group"):
        ops.quant_matmul_qalora(x, w.qweight, w.scales, w.zeros, 4, 64, bias, A[:, :2], Bt, 1.0)
    with pytest.raises(ValueError, match="Bt must have shape"):
        ops.quant_matmul_qalora(x, w.qweight, w.scales, w.zeros, 4, 64, bias, A, Bt[:, :5], 1.0)
    with pytest.raises(ValueError, match="scale must be a finite"):
        ops.quant_matmul_qalora(x, w.qweight, w.scales, w.zeros, 4, 64, bias, A, Bt, float("nan"))
    with pytest.raises(TypeError, match="2-D floating"):
        ops.quant_matmul_qalora(x, w.qweight, w.scales, w.zeros, 4, 64, bias, A.long(), Bt, 1.0)


def test_qalora_op_compiles(rng):
    w, x, A, Bt, bias = _qalora_case(rng)
    f = torch.compile(lambda t: torch.ops.lorakern.quant_matmul_qalora(t, w.qweight, w.scales, w.zeros, 4, 64, bias,
                                                                       A, Bt, 2.0), fullgraph=True)
    assert torch.equal(f(x), ops.quant_matmul_qalora(x, w.qweight, w.scales, w.zeros, 4, 64, bias, A, Bt, 2.0))
