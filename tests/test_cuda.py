"""Every op on a CUDA device (the Triton kernels compiled for the GPU) against the plain-torch reference:
fp16/bf16/fp32, odd shapes, every bit width and group size, outputs poisoned first (the caching allocator's
next blocks are filled with NaN), malformed bank tables and CSR outliers handled without out-of-bounds access,
MoLA routing on the device, and torch.compile of a quantized model with adapters.

Skipped without a GPU. ``LORAKERN_CUDA_TESTS_EMULATE=1`` runs the same checks on CPU tensors through the CUDA
backend's functions (``lorakern.ops.cuda``) with Triton in the interpreter, which is how this file itself is
tested on machines without a GPU (bf16 dots are skipped there: the interpreter computes them wrongly).
``benchmarks/gpu_check.py`` runs this module with ``TRITON_INTERPRET=0`` on a GPU.
"""
import copy
import os

import pytest
import torch

from lorakern.formats.lora import LoraLayer
from lorakern.multilora import AdapterBank
from lorakern.ops import reference as ref
from lorakern.testing import (DOT_EPS, EPS, OUTLIER_PATTERNS, fp_bound, outlier_terms, random_bank, random_compressed,
                              random_outliers, random_qweight, tiny_llama)

HAS_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
EMULATE = not HAS_CUDA and os.environ.get("LORAKERN_CUDA_TESTS_EMULATE") == "1"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not (HAS_CUDA or EMULATE),
    reason="no CUDA device (or TRITON_INTERPRET=1); LORAKERN_CUDA_TESTS_EMULATE=1 runs these checks in the "
           "Triton interpreter")]
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not HAS_CUDA, reason="the Triton interpreter computes bf16 tl.dot wrongly"))
DTYPES = [torch.float16, BF16, torch.float32]


def op(name, *args):
    """``torch.ops.lorakern.<name>`` on the device (emulated: the CUDA backend's function on CPU tensors)."""
    poison()
    if HAS_CUDA:
        out = getattr(torch.ops.lorakern, name)(*args)
        torch.cuda.synchronize()
        return out
    from lorakern.ops import cuda as backend
    return getattr(backend, f"{name}_cuda")(*args)


def poison():
    """Fill the caching allocator's free blocks with NaN, so an output the kernel leaves unwritten shows."""
    if HAS_CUDA:
        for mb in (1, 16, 64):
            t = torch.empty(mb << 18, device=DEV)
            t.fill_(float("nan"))
            del t


def dev(*ts):
    out = tuple(None if t is None else t.to(DEV) for t in ts)
    return out if len(out) > 1 else out[0]


def dev_list(ts):
    return [t.to(DEV) for t in ts]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_dequantize_exact(bits, G, rng):
    w = random_qweight(45, 3 * G, bits, G, rng)
    got = op("dequantize", *dev(w.qweight, w.scales, w.zeros), bits, G)
    assert torch.equal(got.cpu(), w.dequantize())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_matmul(bits, G, dtype, rng):
    for M, N, groups, with_bias in ((1, 67, 2, True), (5, 129, 1, False), (37, 45, 3, True), (130, 70, 2, True)):
        K = G * groups  # M covers the decode / small / medium / large tile configs
        w = random_qweight(N, K, bits, G, rng)
        x = torch.randn(M, K, generator=rng).to(dtype)
        bias = torch.randn(N, generator=rng) if with_bias else None
        y = op("quant_matmul", dev(x), *dev(w.qweight, w.scales, w.zeros), bits, G, dev(bias))
        assert y.dtype == dtype and y.shape == (M, N) and y.device.type == DEV.type
        want = ref.quant_matmul(x, w.qweight, w.scales, w.zeros, bits, G, bias).float()
        tol = fp_bound(x, w, 2 * DOT_EPS[dtype]) + DOT_EPS[dtype] * want.abs() + 1e-5
        assert ((y.cpu().float() - want).abs() <= tol).all(), (M, N, K)


@pytest.mark.parametrize("pattern", OUTLIER_PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gwq_matmul(pattern, dtype, rng):
    for bits, G, M in ((4, 128, 1), (3, 64, 17), (2, 32, 70)):
        N, K = 67, 2 * G
        w = random_qweight(N, K, bits, G, rng)
        o = random_outliers(N, K, pattern, rng)
        x = torch.randn(M, K, generator=rng).to(dtype)
        bias = torch.randn(N, generator=rng)
        y = op("gwq_matmul", dev(x), *dev(w.qweight, w.scales, w.zeros), bits, G,
               *dev(o.row_ptr, o.col_idx, o.values), dev(bias))
        want = ref.gwq_matmul(x, w.qweight, w.scales, w.zeros, bits, G, o.row_ptr, o.col_idx, o.values, bias).float()
        st, longest = outlier_terms(x, o)
        tol = (fp_bound(x, w, 2 * DOT_EPS[dtype]) + (longest + 2) * 2.0**-23 * st + DOT_EPS[dtype] * want.abs() + 1e-5)
        assert ((y.cpu().float() - want).abs() <= tol).all()


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input(outliers, dtype, rng):
    """quant_matmul / gwq_matmul's gradient kernel (training on a quantized base), every tile config."""
    for bits, G, M in ((4, 128, 3), (3, 64, 37), (2, 32, 130)):
        N, K = 75, 2 * G
        w = random_qweight(N, K, bits, G, rng)
        o = random_outliers(N, K, "5pct", rng)
        csr = (o.row_ptr, o.col_idx, o.values) if outliers else ()
        g = torch.randn(M, N, generator=rng).to(dtype)
        name = "gwq_matmul_grad_input" if outliers else "quant_matmul_grad_input"
        dx = op(name, dev(g), *dev(w.qweight, w.scales, w.zeros), bits, G, *[dev(t) for t in csr])
        assert dx.dtype == dtype and dx.shape == (M, K)
        want = getattr(ref, name)(g.float(), w.qweight, w.scales, w.zeros, bits, G, *csr).double()
        w_abs = w.dequantize().abs() + (ref.outliers_dense(*csr, N, K).abs() if outliers else 0)
        tol = 4 * DOT_EPS[dtype] * (g.double().abs() @ w_abs.double()) + DOT_EPS[dtype] * want.abs() + 1e-5
        assert ((dx.cpu().double() - want).abs() <= tol).all(), (bits, G, M)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_matmul_qalora(dtype, rng):
    """The fused unmerged QA-LoRA op (pooled shrink in the K loop, expand in the epilogue) at several ranks."""
    for M, r, G in ((1, 16, 64), (9, 5, 32), (70, 40, 128)):
        N, K = 67, 3 * G
        w = random_qweight(N, K, 4, G, rng)
        x = torch.randn(M, K, generator=rng).to(dtype)
        A, Bt, bias = torch.randn(r, K // G, generator=rng), torch.randn(r, N, generator=rng) * 0.1, torch.randn(N)
        y = op("quant_matmul_qalora", dev(x), *dev(w.qweight, w.scales, w.zeros), 4, G, dev(bias), dev(A), dev(Bt),
               0.5)
        want = ref.quant_matmul_qalora(x, w.qweight, w.scales, w.zeros, 4, G, bias, A, Bt, 0.5).double()
        terms = (x.double().abs() @ w.dequantize().double().abs().t()
                 + 0.5 * (ref.qalora_pool(x.double().abs(), G) @ A.double().abs().t()) @ Bt.double().abs())
        tol = 4 * DOT_EPS[dtype] * terms + DOT_EPS[dtype] * want.abs() + 1e-5
        assert ((y.cpu().double() - want).abs() <= tol).all(), (M, r, G)


def test_gwq_damaged_csr_reads_nothing_out_of_bounds():
    w = random_qweight(8, 128, 4, 128)
    o = random_outliers(8, 128, "5pct")
    rp, ci = o.row_ptr.clone(), o.col_idx.clone()
    rp[3] = 10_000
    if ci.numel():
        ci[0] = 60_000
    y = op("gwq_matmul", dev(torch.randn(2, 128, dtype=torch.float16)), *dev(w.qweight, w.scales, w.zeros), 4, 128,
           *dev(rp, ci, o.values), None)
    assert y.shape == (2, 8)


LORA_CASES = [(1, 256, 384, 16, 4, 128, 128), (3, 96, 160, 7, 3, 32, 32), (17, 192, 576, 16, 16, 64, 64),
              (33, 64, 128, 5, 0, 128, 64), (70, 256, 128, 128, 40, 128, 128)]  # M, N, K, r, h, ga, gb


@pytest.mark.parametrize("bits_hi", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_mixed_and_quant_matmul_lora(bits_hi, dtype, rng):
    for M, N, K, r, h, ga, gb in LORA_CASES:
        c = random_compressed(N, K, r, h, bits_hi, ga, gb, rng)
        ad, bh = c.op_tensors(), c.bits_high  # (an adapter with h = 0 records its own bits_high)
        x = (torch.randn(M, K, generator=rng) * 2).to(dtype)
        base = torch.randn(M, N, generator=rng).to(dtype)
        y = op("lora_mixed", dev(x), dev(base), dev_list(ad), bh, ga, gb, c.scale)
        full = ref.lora_mixed(x.float(), base.float(), ad, bh, ga, gb, c.scale).double()
        B, A = c.factors()
        terms = abs(c.scale) * (x.double().abs() @ A.double().abs().t()) @ B.double().abs().t()
        tol = 4 * DOT_EPS[dtype] * (terms + base.double().abs()) + EPS[dtype] * full.abs()
        assert y.dtype == dtype and ((y.cpu().double() - full).abs() <= tol + 1e-30).all(), (M, N, K, r, h)
        w = random_qweight(N, K, 4, 32, rng)
        yf = op("quant_matmul_lora", dev(x), *dev(w.qweight, w.scales, w.zeros), 4, 32, None, dev_list(ad), bh,
                ga, gb, c.scale)
        fullf = ref.quant_matmul_lora(x.float(), w.qweight, w.scales, w.zeros, 4, 32, None, ad, bh, ga, gb,
                                      c.scale).double()
        tolf = 4 * DOT_EPS[dtype] * (terms + x.double().abs() @ w.dequantize().double().abs().t()) + \
            EPS[dtype] * fullf.abs()
        assert ((yf.cpu().double() - fullf).abs() <= tolf + 1e-30).all()


N_B, K_B = 192, 320


def bank_args(lb):
    slabs, table, scales, ga, gb = lb.op_args()
    return dev_list(slabs), dev(table), dev(scales), ga, gb


def bank_tolerance(x, lb, b, model, dtype):
    terms = torch.zeros_like(model)
    for sid, s0, n in b.segments.tolist():
        _, A, Bt, _ = ref.bank_factors(lb.slabs(), lb.table, sid, lb.group_a, lb.group_b)
        tok = b.tokens[s0: s0 + n]
        coef = (b.weights[s0: s0 + n].double() * float(lb.scales[sid])).abs()
        terms.index_add_(0, tok, coef[:, None] * (x[tok].double().abs() @ A.double().abs().t()) @ Bt.double().abs())
    return 4 * DOT_EPS[dtype] * terms + 2 * EPS[dtype] * model.abs() + 1e-30


@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mapping", ["one", "distinct", "random", "mixture"])
def test_multi_lora_shrink_expand(bank_dtype, dtype, mapping, rng):
    bank = random_bank(rng, dtype=bank_dtype)
    lb = bank.layers["l"]
    for T in (1, 37, 130):
        if mapping == "one":
            b = bank.batch(torch.full((T,), 3))
        elif mapping == "distinct":
            b = bank.batch(torch.randperm(T, generator=rng) % 6)
        elif mapping == "random":
            b = bank.batch(torch.randint(-1, 6, (T,), generator=rng))
        else:
            b = bank.batch(torch.randint(-1, 6, (T, 3), generator=rng), torch.randn(T, 3, generator=rng))
        x = (torch.randn(T, K_B, generator=rng) * 2).to(dtype)
        base = torch.randn(T, N_B, generator=rng).to(dtype)
        seg, tok, wt = dev(b.segments, b.tokens, b.weights)
        y = op("multi_lora", dev(x), dev(base), *bank_args(lb), seg, tok, wt, lb.max_rank(), b.max_count, b.mixture)
        model = ref.multi_lora(x, base, *lb.op_args(), b.segments, b.tokens, b.weights, lb.max_rank()).double()
        assert y.dtype == dtype and ((y.cpu().double() - model).abs() <= bank_tolerance(x, lb, b, model, dtype)).all()
        t = op("lora_shrink", dev(x), *bank_args(lb), seg, tok, wt, lb.max_rank(), b.max_count)
        t_ref = ref.lora_shrink(x, *lb.op_args(), b.segments, b.tokens, b.weights, lb.max_rank())
        if t_ref.numel():
            assert torch.allclose(t.cpu(), t_ref, rtol=8 * DOT_EPS[dtype], atol=8 * DOT_EPS[dtype] * float(t_ref.abs().max()))
        y2 = op("lora_expand", dev(t_ref), dev(base), *bank_args(lb), seg, tok, b.max_count, b.mixture)
        want = ref.lora_expand(t_ref, base, *lb.op_args(), b.segments, b.tokens).double()
        assert ((y2.cpu().double() - want).abs() <= bank_tolerance(x, lb, b, want, dtype)).all()


def test_multi_lora_slices(rng):
    bank = AdapterBank({"q": (192, K_B), "k": (64, K_B), "v": (64, K_B)}, dtype=torch.float16)
    for i in range(4):
        layers = {n: LoraLayer(torch.randn(8, K_B, generator=rng) * 0.2, torch.randn(w, 8, generator=rng) * 0.2, 1.5)
                  for n, w in (("q", 192), ("k", 64), ("v", 64))}
        if i == 2:
            layers["q"] = random_compressed(192, K_B, 8, 3, 2, 64, 64, rng)
        bank.add(f"a{i}", layers)
    lbs = [bank.layers[n] for n in ("q", "k", "v")]
    b = bank.batch(torch.randint(-1, 4, (9,), generator=rng))
    x, base = torch.randn(9, K_B, generator=rng), torch.randn(9, 320, generator=rng)
    args = [lb.op_args() for lb in lbs]
    flat = ([t for a in args for t in a[0]], [a[1] for a in args], [a[2] for a in args], [a[3] for a in args],
            [a[4] for a in args])
    y = op("multi_lora_slices", dev(x), dev(base), dev_list(flat[0]), dev_list(flat[1]), dev_list(flat[2]), flat[3],
           flat[4], *dev(b.segments, b.tokens, b.weights), 8, b.max_count, b.mixture)
    model = ref.multi_lora_slices(x, base, *flat, b.segments, b.tokens, b.weights, 8).double()
    assert torch.allclose(y.cpu().double(), model, rtol=1e-3, atol=1e-3 * float(model.abs().max()))


def test_multi_lora_bad_tables_read_nothing_out_of_bounds(rng):
    """A removed slot or a hostile offset adds nothing on the GPU path (no out-of-bounds access)."""
    bank = random_bank(rng)
    lb = bank.layers["l"]
    b = bank.batch(torch.tensor([1, 2, 3]))
    bank.remove("a2")
    slabs, table, scales, ga, gb = lb.op_args()
    table = table.clone()
    table[1, 5] = 1 << 40
    x, base = torch.randn(3, K_B, generator=rng), torch.randn(3, N_B, generator=rng)
    y = op("multi_lora", dev(x), dev(base), dev_list(slabs), dev(table), dev(scales), ga, gb,
           *dev(b.segments, b.tokens, b.weights), lb.max_rank(), b.max_count, b.mixture).cpu()
    assert torch.equal(y[:2], base[:2]) and not torch.equal(y[2], base[2])


def test_mola_routing_on_the_device(rng):
    """MoLALinear's device path: torch-op routing, a device-side batch (no host copy), one multi_lora call."""
    from lorakern.formats.mola import MoLALayer
    from lorakern.nn.mola_linear import MoLALinear, mixture_batch, mola_expert_loop, route_top_k
    K, N, E = 128, 96, 6
    layer = MoLALayer(torch.randn(E, K, generator=rng),
                      [LoraLayer(torch.randn(r, K, generator=rng) * 0.2, torch.randn(N, r, generator=rng) * 0.2, 2.0 / r)
                       for r in (4, 8, 2, 16, 8, 3)])
    x = torch.randn(21, K, generator=rng)
    base = torch.randn(21, N, generator=rng)
    m = MoLALinear(torch.nn.Linear(K, N).to(DEV), layer, top_k=2, dtype=torch.float32)
    ids, w = route_top_k(dev(x), m.router, 2)
    b = mixture_batch(ids, w, E)
    assert b.tokens.device.type == DEV.type
    slabs, table, scales, ga, gb = m.bank.op_args()
    y = op("multi_lora", dev(x), dev(base), slabs, dev(table), dev(scales), ga, gb, b.segments, b.tokens, b.weights,
           m.bank.max_rank(), b.max_count, b.mixture)
    want = mola_expert_loop(x, base, layer, 2)
    assert torch.allclose(y.cpu().double(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    if HAS_CUDA:  # the module's own forward on the device (routing dispatch included)
        with torch.no_grad():
            got = m(dev(x)).cpu().double()
        want = mola_expert_loop(x, m.base.cpu()(x).detach(), layer, 2)
        m.base.to(DEV)
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


@pytest.mark.skipif(not HAS_CUDA, reason="torch.compile of a model on CUDA needs a GPU")
def test_compiled_quantized_model_with_adapters(tmp_path):
    import lorakern
    from lorakern.testing import save_random_peft_adapters
    model = tiny_llama(seed=1, vocab_size=160, hidden_size=128, intermediate_size=256)
    paths = save_random_peft_adapters(model, tmp_path, {"a": ["q_proj", "v_proj"], "b": ["up_proj", "down_proj"]}, 0.3)
    q = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=64, progress=False).to(DEV).half()
    lorakern.attach_adapters(q, paths, dtype=torch.float16, device=DEV)
    ids = torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEV)
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
              adapter_names=["a", "b"])
    with torch.no_grad():
        lorakern.prepare_decode(q, compile=False)
        eager = q.generate(ids, **kw)
        lorakern.prepare_decode(q)
        compiled = q.generate(ids, **kw)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert (torch.stack(compiled.logits) - torch.stack(eager.logits)).abs().max() < 5e-2
