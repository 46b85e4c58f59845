"""lora_mixed / quant_matmul_lora (compressed adapters) on every CPU ISA path and in the
Triton interpreter, against the references; LoRALinear; bad calls are refused."""
import pytest
import torch

from lorakern._native import native
from lorakern.formats import GWQWeight
from lorakern.nn import GWQLinear, LoRALinear, QuantLinear
from lorakern.ops import reference as ref
from lorakern import testing as oracle
from lorakern.quant import CompressedLoRA, compress_lora
from lorakern.triton.lora_mixed import lora_mixed_triton, quant_matmul_lora_triton

from lorakern.testing import random_compressed, random_outliers, random_qweight
from lorakern.testing import EPS, terms_bound
from lorakern.testing import DOT_EPS, interpreter_bf16_dot_xfail
INTERPRETER_BF16_DOT = interpreter_bf16_dot_xfail()


def lora_tolerance(x, c: CompressedLoRA, base_terms, out_dtype):
    """Rounding bound of the kernels against the exact model: the shrink's fp32 dot products
    (K/64 + K/G + 8 roundings of |xhat| |A|), carried through |B'|, plus r + 4 roundings of
    every expand term and of the base, plus the output dtype's rounding (added by the caller)."""
    K = c.shape[1]
    ga, _ = c.group_sizes
    B, A = c.factors()
    xa = oracle.quantize_activations_int8(x, ga).reshape(-1, K).double().abs() @ A.double().abs().t()
    shrink = (K // min(ga, 64) + K // ga + 8) * EPS[torch.float32] * xa
    expand_terms = abs(c.scale) * (xa @ B.double().abs().t())
    return (abs(c.scale) * (shrink @ B.double().abs().t())
            + (c.rank + 4) * EPS[torch.float32] * (expand_terms + base_terms))


def adapter_act_bound(x, c: CompressedLoRA):
    """|delta(x) - delta(xhat)| bound from the shrink's int8 activations (half a step per element)."""
    K = c.shape[1]
    Bm, A = c.factors()
    blk = min(c.group_sizes[0], 64)
    half = x.reshape(-1, K // blk, blk).double().abs().amax(-1, keepdim=True) / 127 / 2
    return abs(c.scale) * (half.expand(-1, -1, blk).reshape(-1, K) @ A.double().abs().t()) @ Bm.double().abs().t()


CASES = [  # M, N, K, r, h, ga, gb
    (1, 256, 384, 16, 4, 128, 128),
    (3, 96, 160, 7, 3, 32, 32),
    (17, 192, 576, 16, 16, 64, 64),   # all components high
    (33, 64, 128, 5, 0, 128, 64),     # all components 1-bit
    (1, 1536, 576, 16, 9, 64, 128),   # SmolLM2's up_proj
    (2, 128, 256, 1, 1, 128, 128),    # rank 1
    (5, 256, 128, 128, 40, 128, 128),  # rank 128
    (2, 96, 160, 7, 3, 32, 32),       # decode (M <= 2: codes decoded in registers), groups of 32
    (1, 320, 192, 16, 4, 64, 64),     # decode, groups of 64 (16-byte 2-bit groups)
    (1, 1344, 96, 13, 2, 32, 32),     # decode, 42 groups of B'^T: the 1-bit expand's 16-group chunks, a ragged one
]


@pytest.mark.parametrize("bits_hi", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lora_mixed_cpu_matches_reference(isa, bits_hi, dtype, rng):
    for M, N, K, r, h, ga, gb in CASES:
        c = random_compressed(N, K, r, h, bits_hi, ga, gb, rng)
        ad, bits_hi = c.op_tensors(), c.bits_high  # an empty high part is written as 2-bit
        x = (torch.randn(M, K, generator=rng) * 2).to(dtype)
        base = torch.randn(M, N, generator=rng).to(dtype)
        y = torch.ops.lorakern.lora_mixed(x, base, ad, bits_hi, ga, gb, c.scale)
        assert y.dtype == dtype and y.shape == (M, N)
        model = oracle.lora_mixed_int8_act(x, base, ad, bits_hi, ga, gb, c.scale)
        tol = lora_tolerance(x, c, base.double().abs(), dtype) + EPS[dtype] * model.abs()
        err = (y.double() - model).abs()
        assert torch.isfinite(y).all() and (err <= tol + 1e-30).all(), f"{(M, N, K, r, h)}: max err {err.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prepared_lora_in_place_equals_out_of_place(isa, dtype, rng):
    """PreparedLoRA.lora_mixed (the lean decode path for 2-D, contiguous inputs) gives exactly the checked op's
    result, and lora_mixed_ (base += adapter in place, the C ABI with base == y) exactly lora_mixed's, on the lean
    path and on the general one (3-D, non-contiguous); a base needing grad is refused."""
    from lorakern.ops.cpu import PreparedLoRA

    for M, N, K, r, h, ga, gb in CASES[:3] + CASES[7:]:
        c = random_compressed(N, K, r, h, 2, ga, gb, rng)
        p = PreparedLoRA(c.op_tensors(), c.bits_high, ga, gb, N, K, c.scale)
        for shape in ((M, K), (2, M, K)):
            x = (torch.randn(*shape, generator=rng) * 2).to(dtype)
            base = torch.randn(*shape[:-1], N, generator=rng).to(dtype)
            want = p.lora_mixed(x, base)
            assert not torch.equal(want, base)
            # the lean path (2-D) and the general one (3-D) against the op with every argument checked
            assert torch.equal(want, torch.ops.lorakern.lora_mixed(x, base, c.op_tensors(), c.bits_high, ga, gb,
                                                                    c.scale)), (M, N, K, shape)
            got = base.clone()
            assert p.lora_mixed_(x, got) is got and torch.equal(got, want), (M, N, K, shape)
            if len(shape) == 3 and M > 1:  # non-contiguous x and base: the general path
                xn, bn = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (x, base))
                assert not bn.is_contiguous() and torch.equal(p.lora_mixed_(xn, bn), want)
        with pytest.raises(RuntimeError, match="requires grad"):
            p.lora_mixed_(x.float() if dtype == torch.float32 else x, base.clone().requires_grad_())


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_matmul_lora_cpu_matches_reference(isa, bits, dtype, rng):
    for M, N, K, r, h, ga, gb in CASES:
        w = random_qweight(N, K, bits, ga if M != 3 else 64 if K % 64 == 0 else 32, rng)
        c = random_compressed(N, K, r, h, 3, ga, gb, rng)
        ad = c.op_tensors()
        x = (torch.randn(M, K, generator=rng) * 2).to(dtype)
        bias = torch.randn(N, generator=rng) if M != 17 else None
        args = (w.qweight, w.scales, w.zeros, bits, w.group_size, bias, ad, c.bits_high, ga, gb, c.scale)
        y = torch.ops.lorakern.quant_matmul_lora(x, *args)
        model = oracle.quant_matmul_lora_int8_act(x, *args).reshape(M, N)
        base_terms = terms_bound(x, w, bias).double() * (K // min(w.group_size, 64) + K // w.group_size + 8)
        tol = lora_tolerance(x, c, base_terms, dtype) + EPS[dtype] * model.abs()
        err = (y.double() - model).abs()
        assert (err <= tol + 1e-30).all(), f"{(M, N, K, r, h)}: max err {err.max():.3g}"
        if dtype == torch.float32:  # one call equals the two ops it fuses (bf16 rounds between them)
            two = torch.ops.lorakern.lora_mixed(x, torch.ops.lorakern.quant_matmul(x, *args[:6]), *args[6:])
            torch.testing.assert_close(y, two, rtol=0, atol=0)


@pytest.mark.parametrize("M", [1, 5, 40])
def test_lora_every_output_written(isa, M, rng):
    """Poison the output with NaN and call the C++ kernels directly."""
    from lorakern.ops.cpu import _lora_record  # the lk_lora record the binding takes
    N, K = 192, 256
    c = random_compressed(N, K, 12, 5, 2, 128, 64, rng)
    ga, gb = c.group_sizes
    record, _rank, _keep = _lora_record(c.op_tensors(), 2, ga, gb, N, K, c.scale)
    x = torch.randn(M, K, generator=rng)
    base = torch.randn(M, N, generator=rng)
    y = torch.full((M, N), float("nan"))
    native().lora_mixed(x.data_ptr(), 0, M, record, base.data_ptr(), y.data_ptr(), 2)
    assert torch.isfinite(y).all()
    w = random_qweight(N, K, 4, 128, rng)
    y = torch.full((M, N), float("nan"))
    native().quant_matmul_lora(x.data_ptr(), 0, M, w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(),
                               N, K, 4, 128, 0, record, y.data_ptr(), 2)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("bits_hi", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=INTERPRETER_BF16_DOT),
                                   torch.float32])
def test_lora_triton_matches_reference(bits_hi, dtype, rng):
    for M, N, K, r, h, ga, gb in CASES[:4] + CASES[6:]:  # ranks 7 to 128, h = 0 and h = r
        c = random_compressed(N, K, r, h, bits_hi, ga, gb, rng)
        ad, bits_hi = c.op_tensors(), c.bits_high
        x = (torch.randn(M, K, generator=rng) * 2).to(dtype)
        base = torch.randn(M, N, generator=rng).to(dtype)
        y = lora_mixed_triton(x, base, ad, bits_hi, ga, gb, c.scale)
        full = ref.lora_mixed(x.float(), base.float(), ad, bits_hi, ga, gb, c.scale).double()
        B, A = c.factors()
        # tl.dot rounds x and A' to the activation dtype (fp16/bf16) or runs 3xTF32 (fp32)
        terms = abs(c.scale) * (x.double().abs() @ A.double().abs().t()) @ B.double().abs().t()
        tol = 4 * DOT_EPS[dtype] * (terms + base.double().abs()) + EPS[dtype] * full.abs()
        err = (y.double() - full).abs()
        assert (err <= tol + 1e-30).all(), f"{(M, N, K, r, h)}: max err {err.max():.3g}"
        w = random_qweight(N, K, 4, 32, rng)
        yf = quant_matmul_lora_triton(x, w.qweight, w.scales, w.zeros, 4, 32, None, ad, bits_hi, ga, gb, c.scale)
        fullf = ref.quant_matmul_lora(x.float(), w.qweight, w.scales, w.zeros, 4, 32, None, ad, bits_hi, ga, gb,
                                      c.scale).double()
        wterms = x.double().abs() @ w.dequantize().double().abs().t()
        tolf = 4 * DOT_EPS[dtype] * (terms + wterms) + EPS[dtype] * fullf.abs()
        assert ((yf.double() - fullf).abs() <= tolf + 1e-30).all()


def test_lora_linear_wraps_every_base(rng):
    N, K = 192, 256
    lin = torch.nn.Linear(K, N)
    B, A = torch.randn(N, 16, generator=rng) * 0.1, torch.randn(16, K, generator=rng) * 0.1
    x = torch.randn(4, K, generator=rng)

    class Layer:  # the LoraLayer interface: A, B, scale
        pass
    fp = Layer()
    fp.A, fp.B, fp.scale = A, B, 2.0
    y = LoRALinear(lin, fp, dtype=torch.float32)(x)
    torch.testing.assert_close(y, lin(x) + 2.0 * (x @ A.t()) @ B.t(), rtol=1e-5, atol=1e-5)
    c = compress_lora(B, A, rho=0.8, bits_high=3, scale=2.0)
    ql = QuantLinear.from_linear(lin, bits=4, group_size=128)
    o = random_outliers(N, K, "1pct", rng)
    gl = GWQLinear(GWQWeight(ql.quantized_weight, o), lin.bias.detach())
    for base in (lin, ql, gl):
        got = LoRALinear(base, c)(x)
        want = base(x).double() + x.double() @ c.delta().double().t()
        tol = 1e-4 * (1 + want.abs()) + adapter_act_bound(x, c)
        assert ((got.double() - want).abs() <= tol).all(), type(base).__name__
    with pytest.raises(ValueError, match="adapter is for"):
        LoRALinear(torch.nn.Linear(K, N + 1), c)
    fp.A = A[:, :-1]
    with pytest.raises(ValueError, match="do not fit"):
        LoRALinear(lin, fp)


def test_lora_opcheck_and_compile(rng):
    N, K = 128, 256
    c = random_compressed(N, K, 8, 3, 2, 128, 128, rng)
    ad = c.op_tensors()
    x, base = torch.randn(3, K, generator=rng), torch.randn(3, N, generator=rng)
    w = random_qweight(N, K, 4, 128, rng)
    torch.library.opcheck(torch.ops.lorakern.lora_mixed, (x, base, ad, 2, 128, 128, 1.5))
    torch.library.opcheck(torch.ops.lorakern.quant_matmul_lora,
                          (x, w.qweight, w.scales, w.zeros, 4, 128, None, ad, 2, 128, 128, 1.5))
    layer = LoRALinear(QuantLinear(w), c)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x))


def test_lora_bad_calls_are_refused(rng):
    N, K = 128, 256
    c = random_compressed(N, K, 8, 3, 2, 128, 128, rng)
    ad = c.op_tensors()
    x, base = torch.randn(2, K), torch.randn(2, N)
    op = torch.ops.lorakern.lora_mixed
    with pytest.raises(ValueError, match="12 tensors"):
        op(x, base, ad[:11], 2, 128, 128, 1.0)
    with pytest.raises(ValueError, match="bits_hi"):
        op(x, base, ad, 5, 128, 128, 1.0)
    with pytest.raises(ValueError, match="a_lo"):  # a_lo codes read as 2-bit would be twice as wide
        op(x, base, ad[:6] + [ad[0][:, :16]] + ad[7:], 2, 128, 128, 1.0)
    with pytest.raises(ValueError, match="columns"):
        op(torch.randn(2, 128), base, ad, 2, 128, 128, 1.0)
    with pytest.raises(ValueError, match="ranks"):
        op(x, base, ad[:3] + [t[:2] for t in ad[3:6]] + ad[6:], 2, 128, 128, 1.0)
    with pytest.raises(TypeError, match="base"):
        op(x, base.half(), ad, 2, 128, 128, 1.0)
    with pytest.raises(ValueError, match="base"):
        op(x, torch.randn(3, N), ad, 2, 128, 128, 1.0)
    with pytest.raises(ValueError, match="scale"):
        op(x, base, ad, 2, 128, 128, float("nan"))
    with pytest.raises(ValueError, match="group_size"):
        op(x, base, ad, 2, 96, 128, 1.0)


def test_lora_linear_revalidates_replaced_buffers(rng):
    """The eager fast path validates the adapter once; replaced buffers are validated again."""
    N, K = 128, 256
    c = random_compressed(N, K, 8, 3, 2, 128, 128, rng)
    layer = LoRALinear(QuantLinear(random_qweight(N, K, 4, 128, rng)), c)
    x = torch.randn(2, K, generator=rng)
    y = layer(x)
    layer.lora_a_lo_codes = layer.lora_a_lo_codes[:, :8].clone()  # a_lo codes cut short
    with pytest.raises(ValueError, match="a_lo"):
        layer(x)
    layer.lora_a_lo_codes = c.parts().a_lo[0].clone()
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="last dimension"):
        layer(torch.randn(2, K + 1))


def test_rank_zero_adapter_adds_nothing(isa, rng):
    N, K = 96, 64
    c = CompressedLoRA(None, None, None, None, (N, K), 0, 0, 1.0)
    x, base = torch.randn(3, K, generator=rng), torch.randn(3, N, generator=rng)
    w = random_qweight(N, K, 4, 64, rng)
    ad = c.op_tensors()
    assert torch.equal(torch.ops.lorakern.lora_mixed(x, base, ad, 2, 64, 32, 1.0), base)
    y = torch.ops.lorakern.quant_matmul_lora(x, w.qweight, w.scales, w.zeros, 4, 64, None, ad, 2, 64, 32, 1.0)
    torch.testing.assert_close(y, torch.ops.lorakern.quant_matmul(x, w.qweight, w.scales, w.zeros, 4, 64), rtol=0,
                               atol=0)
