"""Multi-adapter LoRA (AdapterBank, LoRABatch, lora_shrink / lora_expand / multi_lora) on every
CPU ISA path against the reference loops, at random mappings; bank bookkeeping; bad input."""
import pytest
import torch

from lorakern.adapters.peft_io import LoraLayer
from lorakern.multilora import AdapterBank, LoRABatch
from lorakern.ops import reference as ref
from lorakern import testing as oracle

from lorakern.testing import random_bank, random_compressed
from lorakern.testing import EPS

N, K = 192, 320  # multiples of the compressed groups (64), N not a multiple of the 128-column tile


def mapping(kind, T, n, rng):
    """Per-token ids of a given pattern over n adapters."""
    if kind == "one":
        return torch.full((T,), n // 2, dtype=torch.int64)
    if kind == "distinct":
        return torch.randperm(T, generator=rng) % n
    if kind == "none":
        return torch.full((T,), -1, dtype=torch.int64)
    return torch.randint(-1, n, (T,), generator=rng)  # unsorted, with -1 and unused adapters


def tolerance(x, lb, b, model, dtype):
    """fp32 rounding of every term the kernel adds (K-term dots, r-term expands; |xhat| <= |x| (1 + 2^-7)),
    plus the output dtype's rounding."""
    terms = torch.zeros_like(model)
    for sid, s0, n in b.segments.tolist():
        _, A, Bt, _ = ref.bank_factors(lb.slabs(), lb.table, sid, lb.group_a, lb.group_b)
        tok = b.tokens[s0: s0 + n]
        coef = (b.weights[s0: s0 + n].double() * float(lb.scales[sid])).abs()
        xa = x[tok].double().abs() * 1.01 @ A.double().abs().t()  # |xhat| <= |x| (1 + 2^-7)
        terms.index_add_(0, tok, coef[:, None] * xa @ Bt.double().abs())
    return (x.shape[1] + 64 + 8) * EPS[torch.float32] * terms + EPS[dtype] * model.abs() * 2 + 1e-30


def run(op, lb, b, x, base=None):
    args = (*lb.op_args(), b.segments, b.tokens)
    if op == "multi":
        return torch.ops.lorakern.multi_lora(x, base, *args, b.weights, lb.max_rank())
    t = torch.ops.lorakern.lora_shrink(x, *args, b.weights, lb.max_rank())
    return torch.ops.lorakern.lora_expand(t, base, *args)


def run_checked(op, lb, b, x, base, dtype, what):
    """run() against the int8-activation model within tolerance(); returns y."""
    y = run(op, lb, b, x, base)
    model = oracle.multi_lora_int8_act(x, base, *lb.op_args(), b.segments, b.tokens, b.weights, lb.max_rank())
    err = (y.double() - model).abs()
    tol = tolerance(x, lb, b, model, dtype)
    assert (err <= tol).all(), f"{what}: max err {err.max():.3g}, tol there {tol.flatten()[err.argmax()]:.3g}"
    return y


@pytest.mark.parametrize("kind", ["one", "distinct", "none", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["multi", "shrink_expand"])
@pytest.mark.parametrize("groups", [64, 128])
def test_multi_lora_cpu_matches_reference(isa, kind, dtype, op, groups, rng):
    """groups 64: N = 192 (a ragged last column tile); 128: N = 384, K = 256, where every compressed width
    (2, 3, 4 bits and the 1-bit planes) is expanded straight from its codes for one or two entries."""
    n_, k_ = (N, K) if groups == 64 else (384, 256)
    bank = random_bank(rng, dtype=dtype if dtype != torch.float32 else torch.float16, N=n_, K=k_, ga=groups, gb=groups)
    lb = bank.layers["l"]
    for T in (1, 7, 37):
        b = bank.batch(mapping(kind, T, 6, rng))
        x = (torch.randn(T, k_, generator=rng) * 2).to(dtype)
        base = torch.randn(T, n_, generator=rng).to(dtype)
        y = run_checked(op, lb, b, x, base, dtype, f"T={T}")
        assert y.dtype == dtype and y.shape == (T, n_)
        if kind == "none":
            assert torch.equal(y, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["multi", "shrink_expand"])
def test_many_segments_match_reference(isa, dtype, op, rng):
    """Batches of many small segments (decode: each sequence its own adapter), where one work item covers a whole
    segment block and gathers its own rows, and of few, around the switch between the two (4 segment blocks per
    thread): 18 adapters of mixed kinds and ranks, 1-3 entries each, a segment of 40 (two blocks), -1 ids."""
    ranks = (8, 16, 5, 12, 16, 1, 4, 9) * 2 + (16, 3)
    kinds = "dcdccdcc" * 2 + "cd"
    bank = random_bank(rng, ranks=ranks, kinds=kinds)
    lb = bank.layers["l"]
    for n_used in (1, 3, 4, 5, 8, 9, 18):
        ids = torch.cat([torch.arange(n_used).repeat_interleave(torch.randint(1, 4, (n_used,), generator=rng)),
                         torch.full((40,), n_used // 2), torch.full((3,), -1)])
        ids = ids[torch.randperm(ids.numel(), generator=rng)]
        T = ids.numel()
        b = bank.batch(ids)
        x = (torch.randn(T, K, generator=rng) * 2).to(dtype)
        base = torch.randn(T, N, generator=rng).to(dtype)
        y = run_checked(op, lb, b, x, base, dtype, f"{n_used} adapters")
        assert torch.equal(y[ids < 0], base[ids < 0])


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("n", [6, 18])  # 18: many segments (whole items), a token in several: expand after a barrier
def test_mixtures_match_reference(isa, k, n, rng):
    bank = random_bank(rng, dtype=torch.bfloat16, ranks=((8, 16, 5, 64, 16, 1) * 3)[:n], kinds=("dcdccd" * 3)[:n])
    lb = bank.layers["l"]
    T = 29
    ids = torch.randint(-1, n, (T, k), generator=rng)
    ids[0] = 3  # one token with the same adapter twice
    w = torch.randn(T, k, generator=rng)
    b = bank.batch(ids, w)
    x, base = torch.randn(T, K, generator=rng), torch.randn(T, N, generator=rng)
    y = run("multi", lb, b, x, base)
    model = oracle.multi_lora_int8_act(x, base, *lb.op_args(), b.segments, b.tokens, b.weights, lb.max_rank())
    assert ((y.double() - model).abs() <= tolerance(x, lb, b, model, torch.float32)).all()
    # a mixture equals the weighted sum of single-adapter runs (exactly, up to rounding)
    single = base.double().clone()
    for j in range(k):
        bj = bank.batch(ids[:, j])
        yj = run("multi", lb, bj, x, torch.zeros_like(base)).double()
        single += w[:, j:j + 1].double() * yj
    assert torch.allclose(y.double(), single, rtol=1e-4, atol=1e-4)


def test_dense_fp32_bank_matches_fp64(isa, rng):
    """Dense adapters never see int8 activations: the kernel is the exact product up to fp32 rounding."""
    bank = random_bank(rng, kinds="dddddd", dtype=torch.float32)
    lb = bank.layers["l"]
    for ids in (mapping("random", 41, 6, rng), torch.zeros(70, dtype=torch.int64)):  # 70 tokens: split entries
        check_dense_exact(lb, bank.batch(ids), rng)


def check_dense_exact(lb, b, rng):
    T = b.num_tokens
    x, base = torch.randn(T, K, generator=rng), torch.randn(T, N, generator=rng)
    y = run("multi", lb, b, x, base)
    exact = base.double().clone()
    for sid, s0, n in b.segments.tolist():
        row, r = int(lb.table[sid, 2]), int(lb.table[sid, 1])
        layer_A, layer_Bt = (t[row: row + r].double() for t in lb.dense.tensors)
        tok = b.tokens[s0: s0 + n]
        exact.index_add_(0, tok, float(lb.scales[sid]) * (x[tok].double() @ layer_A.t()) @ layer_Bt)
    assert ((y.double() - exact).abs() <= tolerance(x, lb, b, exact, torch.float32)).all()


def test_ragged_shapes(isa, rng):
    """N and K that are not multiples of 8 or of the 128-column tile (dense adapters only)."""
    for n_, k_ in ((1, 1), (13, 7), (130, 33), (257, 129)):
        bank = AdapterBank({"l": (n_, k_)}, dtype=torch.float32)
        for i, r in enumerate((3, 1, 9)):
            bank.add(f"a{i}", {"l": LoraLayer(torch.randn(r, k_, generator=rng), torch.randn(n_, r, generator=rng),
                                              0.7)})
        lb = bank.layers["l"]
        b = bank.batch(mapping("random", 11, 3, rng))
        x, base = torch.randn(11, k_, generator=rng), torch.randn(11, n_, generator=rng)
        y = run("multi", lb, b, x, base)
        model = oracle.multi_lora_int8_act(x, base, *lb.op_args(), b.segments, b.tokens, b.weights, lb.max_rank())
        assert ((y.double() - model).abs() <= tolerance(x, lb, b, model, torch.float32)).all(), (n_, k_)


def test_bank_add_remove_reuses_rows_and_keeps_others(rng):
    bank = random_bank(rng)
    lb = bank.layers["l"]
    x, base = torch.randn(6, K, generator=rng), torch.randn(6, N, generator=rng)
    keep = bank.batch(["a0", "a1", "a3", "a4", "a5", "__base__"])
    before = run("multi", lb, keep, x, base)
    used = (lb.dense.used, lb.qa.used, lb.qrows.used)
    bank.remove("a2")  # dense rank 5
    bank.add("new", {"l": LoraLayer(torch.randn(4, K, generator=rng), torch.randn(N, 4, generator=rng), 1.0)})
    assert (lb.dense.used, lb.qa.used, lb.qrows.used) == used  # the freed rows were reused
    assert bank.id("new") == 6  # ids are never reused
    after = run("multi", lb, bank.batch(["a0", "a1", "a3", "a4", "a5", "__base__"]), x, base)
    assert torch.equal(before, after)
    bank.remove("a3")  # compressed
    bank.add("c2", {"l": random_compressed(N, K, 8, 4, 2, 64, 64, rng)})
    y = run("multi", lb, bank.batch(["c2", "new", "a0", "a5", "a1", "a4"]), x, base)
    model = oracle.multi_lora_int8_act(x, base, *lb.op_args(), *(lambda b: (b.segments, b.tokens, b.weights))(
        bank.batch(["c2", "new", "a0", "a5", "a1", "a4"])), lb.max_rank())
    assert torch.allclose(y.double(), model, atol=1e-4, rtol=1e-4)
    assert bank.nbytes("new") == 4 * (N + K) * 2


def test_bank_grows_past_its_capacity(rng):
    bank = AdapterBank({"l": (64, 32)}, dtype=torch.float32)
    layers = {}
    for i in range(40):
        r = 1 + i % 7
        layers[i] = LoraLayer(torch.randn(r, 32, generator=rng), torch.randn(64, r, generator=rng), 1.0)
        bank.add(f"a{i}", {"l": layers[i]})
    lb = bank.layers["l"]
    x = torch.randn(40, 32, generator=rng)
    y = run("multi", lb, bank.batch([f"a{i}" for i in range(40)]), x, torch.zeros(40, 64))
    for i in (0, 17, 39):
        exact = layers[i].scale * (x[i:i + 1] @ layers[i].A.t()) @ layers[i].B.t()
        assert torch.allclose(y[i:i + 1], exact, atol=1e-4, rtol=1e-4)


def test_batch_metadata(rng):
    b = LoRABatch.from_ids(torch.tensor([2, -1, 0, 2, 0, 5]), num_slots=6)
    assert b.segments.tolist() == [[0, 0, 2], [2, 2, 2], [5, 4, 1]]
    assert b.tokens.tolist() == [2, 4, 0, 3, 5]  # stable: tokens in order within an adapter
    assert b.max_count == 2 and b.ids == [0, 2, 5]
    r = b.repeat_tokens(3)
    assert r.num_tokens == 18 and r.segments.tolist() == [[0, 0, 6], [2, 6, 6], [5, 12, 3]]
    assert r.tokens.tolist()[:6] == [6, 7, 8, 12, 13, 14]


def test_bad_batches_are_refused(rng):
    bank = random_bank(rng)
    lb = bank.layers["l"]
    with pytest.raises(IndexError, match="out of range"):
        bank.batch(torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="invalid"):
        bank.batch(torch.tensor([0, -2]))
    with pytest.raises(TypeError, match="integers"):
        bank.batch(torch.tensor([0.0, 1.0]))
    with pytest.raises(KeyError, match="no adapter 'zz'"):
        bank.batch(["a0", "zz"])
    with pytest.raises(ValueError, match="must match"):
        bank.batch(torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        bank.batch(torch.zeros(3, 2, dtype=torch.int64), torch.full((3, 2), float("nan")))
    b = bank.batch(torch.tensor([0, 2, 2]))
    bank.remove("a2")
    with pytest.raises(ValueError, match="removed"):
        bank.batch(torch.tensor([0, 2]))
    x, base = torch.randn(3, K), torch.randn(3, N)
    with pytest.raises(ValueError, match="removed"):  # a batch built before the removal
        run("multi", lb, b, x, base)
    b = bank.batch(torch.tensor([0, 1, 3]))
    args = lb.op_args()
    mr = lb.max_rank()
    bad_tok = b.tokens.clone()
    bad_tok[1] = 3
    with pytest.raises(ValueError):
        torch.ops.lorakern.multi_lora(x, base, *args, b.segments, bad_tok, b.weights, mr)
    bad_seg = b.segments.clone()
    bad_seg[0, 2] += 1
    with pytest.raises(ValueError):
        torch.ops.lorakern.multi_lora(x, base, *args, bad_seg, b.tokens, b.weights, mr)
    with pytest.raises(ValueError):  # max_rank too small for adapter a3 (rank 64)
        torch.ops.lorakern.multi_lora(x, base, *args, b.segments, b.tokens, b.weights, 8)
    bad_table = args[1].clone()
    bad_table[1, 5] = 1 << 40  # a hostile code offset
    with pytest.raises(ValueError, match="out of the slab"):
        torch.ops.lorakern.multi_lora(x, base, args[0], bad_table, *args[2:], b.segments, b.tokens, b.weights, mr)
    with pytest.raises(TypeError):
        torch.ops.lorakern.multi_lora(x, base, *args, b.segments.int(), b.tokens, b.weights, mr)
    with pytest.raises(TypeError):
        torch.ops.lorakern.multi_lora(x.long(), base, *args, b.segments, b.tokens, b.weights, mr)
    with pytest.raises(ValueError, match="features"):
        torch.ops.lorakern.multi_lora(x[:, :-1], base, *args, b.segments, b.tokens, b.weights, mr)
    with pytest.raises(ValueError, match="groups"):  # compressed with other group sizes
        bank.add("g", {"l": random_compressed(N, K, 4, 2, 2, 32, 32, rng)})
    with pytest.raises(ValueError, match="does not know"):
        bank.add("g", {"other": LoraLayer(torch.zeros(1, K), torch.zeros(N, 1), 1.0)})
    with pytest.raises(ValueError, match="NaN"):
        bank.add("g", {"l": LoraLayer(torch.full((1, K), float("nan")), torch.zeros(N, 1), 1.0)})
    assert "g" not in bank.names


def test_opcheck_multi_lora(rng):
    bank = random_bank(rng)
    lb = bank.layers["l"]
    b = bank.batch(mapping("random", 5, 6, rng))
    x, base = torch.randn(5, K, generator=rng), torch.randn(5, N, generator=rng)
    args = (*lb.op_args(), b.segments, b.tokens)
    torch.library.opcheck(torch.ops.lorakern.multi_lora.default, (x, base, *args, b.weights, lb.max_rank()),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.lorakern.lora_shrink.default, (x, *args, b.weights, lb.max_rank()),
                          test_utils=("test_schema", "test_faketensor"))


# ---- Triton (interpreter) ----------------------------------------------------------------------------------

from lorakern.triton.multi_lora import lora_expand_triton, lora_shrink_triton, multi_lora_triton  # noqa: E402

from lorakern.testing import DOT_EPS, interpreter_bf16_dot_xfail  # noqa: E402
INTERPRETER_BF16_DOT = interpreter_bf16_dot_xfail()


def triton_tolerance(x, lb, b, model, dtype):
    """Every product's inputs rounded to the dot's precision (fp16 inputs for a 16-bit x, ~fp32 otherwise),
    a few times over (shrink, then expand), plus the output cast."""
    terms = tolerance(x, lb, b, model, torch.float32) / ((K + 72) * EPS[torch.float32])
    return 4 * DOT_EPS[dtype] * terms + 2 * EPS[dtype] * model.abs() + 1e-30


@pytest.mark.parametrize("kind", ["one", "distinct", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=INTERPRETER_BF16_DOT)])
def test_multi_lora_triton_matches_reference(kind, dtype, rng):
    bank = random_bank(rng, dtype=torch.float16)
    lb = bank.layers["l"]
    for T in (1, 37):
        b = bank.batch(mapping(kind, T, 6, rng))
        x = (torch.randn(T, K, generator=rng) * 2).to(dtype)
        base = torch.randn(T, N, generator=rng).to(dtype)
        args = (*lb.op_args(), b.segments, b.tokens)
        y = multi_lora_triton(x, base, *args, b.weights, lb.max_rank(), b.max_count, b.mixture)
        model = ref.multi_lora(x, base, *args, b.weights, lb.max_rank()).double()
        err = (y.double() - model).abs()
        assert y.dtype == dtype and (err <= triton_tolerance(x, lb, b, model, dtype)).all(), err.max()
        # the separate ops agree with the fused one
        t = lora_shrink_triton(x, *args, b.weights, lb.max_rank())
        t_ref = ref.lora_shrink(x, *args, b.weights, lb.max_rank())
        assert torch.allclose(t, t_ref, rtol=8 * DOT_EPS[dtype], atol=8 * DOT_EPS[dtype] * float(t_ref.abs().max()) if t_ref.numel() else 0.0)
        y2 = lora_expand_triton(t_ref, base, *args)
        want = ref.lora_expand(t_ref, base, *args).double()
        assert ((y2.double() - want).abs() <= triton_tolerance(x, lb, b, want, dtype)).all()


def test_multi_lora_triton_mixtures_and_split_k(rng):
    bank = random_bank(rng, dtype=torch.bfloat16, N=128, K=2048)  # K >= 2048 and few tokens: split-K
    lb = bank.layers["l"]
    x, base = torch.randn(5, 2048, generator=rng), torch.randn(5, 128, generator=rng)
    ids = torch.randint(-1, 6, (5, 3), generator=rng)
    ids[0, :2] = 2
    b = bank.batch(ids, torch.randn(5, 3, generator=rng))
    args = (*lb.op_args(), b.segments, b.tokens, b.weights, lb.max_rank())
    y = multi_lora_triton(x, base, *args, b.max_count, b.mixture)
    model = ref.multi_lora(x, base, *args).double()
    assert ((y.double() - model).abs() <= triton_tolerance(x, lb, b, model, torch.float32)).all()


def test_multi_lora_triton_ragged_dense(rng):
    bank = AdapterBank({"l": (130, 33)}, dtype=torch.float32)
    for i, r in enumerate((3, 17, 9)):
        bank.add(f"a{i}", {"l": LoraLayer(torch.randn(r, 33, generator=rng), torch.randn(130, r, generator=rng), 0.3)})
    lb = bank.layers["l"]
    b = bank.batch(mapping("random", 19, 3, rng))
    x, base = torch.randn(19, 33, generator=rng), torch.randn(19, 130, generator=rng)
    args = (*lb.op_args(), b.segments, b.tokens, b.weights, lb.max_rank())
    y = multi_lora_triton(x, base, *args, b.max_count, b.mixture)
    model = ref.multi_lora(x, base, *args).double()
    assert ((y.double() - model).abs() <= triton_tolerance(x, lb, b, model, torch.float32)).all()


def test_multi_lora_triton_is_memory_safe_on_bad_tables(rng):
    """A removed slot or a hostile offset adds nothing on the GPU path (no out-of-bounds access)."""
    bank = random_bank(rng, dtype=torch.float16)
    lb = bank.layers["l"]
    b = bank.batch(torch.tensor([1, 2, 3]))
    bank.remove("a2")
    table = lb.op_args()[1].clone()
    table[1, 5] = 1 << 40
    x, base = torch.randn(3, K, generator=rng), torch.randn(3, N, generator=rng)
    a = lb.op_args()
    y = multi_lora_triton(x, base, a[0], table, *a[2:], b.segments, b.tokens, b.weights, lb.max_rank(), b.max_count,
                          b.mixture)
    assert torch.equal(y[:2], base[:2])  # slot 1 (hostile offset) and slot 2 (removed) contribute nothing
    assert not torch.equal(y[2], base[2])


# ---- several output slices in one call (q/k/v of different widths) -----------------------------------------

from lorakern.multilora import apply_slices, apply_slices_  # noqa: E402


def qkv_bank(rng, dtype=torch.float16, ga_k=64):
    """q (192), k and v (64) banks over K = 320; adapter 'c' compressed (its A in groups of 64, of ``ga_k`` on k),
    the others dense, 'k_only' on k alone."""
    widths = {"q": 192, "k": 64, "v": 64}
    bank = AdapterBank({n: (w, K) for n, w in widths.items()}, dtype=dtype)
    for name, r in (("d8", 8), ("d16", 16), ("c", 12)):
        layers = {}
        for lname, w in widths.items():
            if name == "c":
                layers[lname] = random_compressed(w, K, r, 4, 3, ga_k if lname == "k" else 64, 64, rng)
            else:
                layers[lname] = LoraLayer(torch.randn(r, K, generator=rng) * 0.2, torch.randn(w, r, generator=rng) * 0.2,
                                          0.7)
        bank.add(name, layers)
    bank.add("k_only", {"k": LoraLayer(torch.randn(5, K, generator=rng), torch.randn(64, 5, generator=rng), 1.0)})
    return bank, [bank.layers[n] for n in widths]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ga_k", [64, 32])  # one quantization of x for all slices; 32: k's slice quantizes its own
def test_slices_match_reference_and_single_layers(isa, dtype, ga_k, rng):
    bank, lbs = qkv_bank(rng, ga_k=ga_k)
    T = 23
    b = bank.batch(torch.randint(-1, 4, (T,), generator=rng))
    x = torch.randn(T, K, generator=rng).to(dtype)
    base = torch.randn(T, 320, generator=rng).to(dtype)
    y = apply_slices(lbs, x, base, b)
    args = [lb.op_args() for lb in lbs]
    model = oracle.multi_lora_slices_int8_act(x, base, [t for a in args for t in a[0]], [a[1] for a in args],
                                           [a[2] for a in args], [a[3] for a in args], [a[4] for a in args],
                                           *b.op_args(), 16)
    col = 0
    for lb in lbs:  # each slice equals its layer alone
        alone = run("multi", lb, b, x, base[:, col: col + lb.N].contiguous())
        assert torch.equal(y[:, col: col + lb.N], alone)
        tol = tolerance(x, lb, b, model[:, col: col + lb.N], dtype)
        assert ((y[:, col: col + lb.N].double() - model[:, col: col + lb.N]).abs() <= tol).all()
        col += lb.N


@pytest.mark.parametrize("T", [23, 300])  # few segment blocks (fine-grained items) and many (whole items)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_equals_out_of_place(isa, T, dtype, rng):
    # vLLM's LoRA layers add into their base output in place (apply_slices_, LayerBank.apply_): the C++ core
    # reads each base element before it writes it there, so the sums are the out-of-place ones bit for bit
    bank, lbs = qkv_bank(rng)
    b = bank.batch(torch.randint(-1, 4, (T,), generator=rng))
    x = torch.randn(T, K, generator=rng).to(dtype)
    base = torch.randn(T, 320, generator=rng).to(dtype)
    want = apply_slices(lbs, x, base, b)
    y = base.clone()
    v = y._version
    assert apply_slices_(lbs, x, y, b) is y
    assert torch.equal(y, want)
    assert y._version > v  # written through its pointer: autograd must still see the change
    y1 = base[:, :192].clone()
    assert lbs[0].apply_(x, y1, b) is y1
    assert torch.equal(y1, lbs[0].apply(x, base[:, :192].contiguous(), b))
    strided = base.clone()[:, :192]  # not contiguous: computed out of place, then copied in
    assert torch.equal(lbs[0].apply_(x, strided, b), y1)
    buf = torch.randn(T * (K + 320)).to(dtype)  # x and y overlapping: refused before any kernel runs
    with pytest.raises(ValueError, match="shares memory with x"):
        apply_slices_(lbs, buf[: T * K].view(T, K), buf[T * K - 320: T * K - 320 + T * 320].view(T, 320), b)
    y2 = base.clone()  # one storage, disjoint ranges: allowed
    z = torch.empty(T * K + T * 320, dtype=dtype)
    z[: T * K] = x.reshape(-1)
    z[T * K:] = base.reshape(-1)
    assert torch.equal(apply_slices_(lbs, z[: T * K].view(T, K), z[T * K:].view(T, 320), b), want)
    with pytest.raises(RuntimeError, match="requires grad"):
        apply_slices_(lbs, x, y2.requires_grad_(), b)


def test_slices_refuse_bad_calls(rng):
    bank, lbs = qkv_bank(rng)
    b = bank.batch(torch.tensor([0, 3, 1]))
    x, base = torch.randn(3, K), torch.randn(3, 320)
    with pytest.raises(ValueError, match="base must be"):
        apply_slices(lbs, x, base[:, :300], b)
    args = [lb.op_args() for lb in lbs]
    with pytest.raises(ValueError, match="3 slices need"):
        torch.ops.lorakern.multi_lora_slices(x, base, [t for a in args for t in a[0]][:-1], [a[1] for a in args],
                                             [a[2] for a in args], [a[3] for a in args], [a[4] for a in args],
                                             *b.op_args(), 16)
    bank.remove("d16")
    with pytest.raises(ValueError, match="removed"):
        apply_slices(lbs, x, base, b)


def test_slices_triton(rng):
    bank, lbs = qkv_bank(rng)
    b = bank.batch(torch.randint(-1, 4, (9,), generator=rng))
    x, base = torch.randn(9, K, generator=rng), torch.randn(9, 320, generator=rng)
    from lorakern.ops.cuda import multi_lora_slices_cuda
    args = [lb.op_args() for lb in lbs]
    flat = ([t for a in args for t in a[0]], [a[1] for a in args], [a[2] for a in args], [a[3] for a in args],
            [a[4] for a in args])
    y = multi_lora_slices_cuda(x, base, *flat, *b.op_args(), 16, b.max_count, b.mixture)  # Triton interpreter
    model = ref.multi_lora_slices(x, base, *flat, *b.op_args(), 16).double()
    assert torch.allclose(y.double(), model, rtol=1e-4, atol=1e-4 * float(model.abs().max()))


def test_bank_copy_owns_its_memory(rng):
    """A deep copy must not keep the original's cached slab pointers (LayerBank.apply's fast path)."""
    import copy
    bank = random_bank(rng)
    lb = bank.layers["l"]
    b = bank.batch(torch.tensor([0, 1, 3]))
    x, base = torch.randn(3, K, generator=rng), torch.randn(3, N, generator=rng)
    y = lb.apply(x, base, b)  # caches the pointers
    lb2 = copy.deepcopy(lb)
    for t in lb.slabs():
        t.zero_()  # the original's adapters are gone; the copy must not notice
    assert torch.equal(lb2.apply(x, base, b), y)
    assert torch.equal(lb.apply(x, base, b), base)


def test_padded_banks_and_the_prepared_slices_path_check_everything():
    """LayerBank.from_padded (vLLM's stacked slots) copies its input and refuses dense writes; the eager slices path
    checks every bank's K and the batch's tensors before the C++ core runs."""
    from lorakern.formats.lora import LoraLayer
    from lorakern.multilora import LoRABatch
    from lorakern.multilora.bank import LayerBank

    g = torch.Generator().manual_seed(5)
    a, bt = torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, 32, generator=g)
    lb1 = LayerBank.from_padded(a, bt, torch.tensor([4, 2]))
    lb2 = LayerBank.from_padded(torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 16, generator=g),
                                torch.tensor([4, 2]))
    b = LoRABatch.from_ids(torch.tensor([0, 1, -1]), num_slots=2)
    x, base = torch.randn(3, 64, generator=g), torch.randn(3, 48, generator=g)
    with pytest.raises(ValueError, match="slice 1 takes K=8"):
        apply_slices([lb1, lb2], x, base, b)
    want = base[:, :32].clone()
    for t, s in enumerate([0, 1]):
        r = (4, 2)[s]
        want[t] += x[t] @ a[s, :r].t() @ bt[s, :r]
    y = lb1.apply(x, base[:, :32].contiguous(), b)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    a.zero_()  # the bank holds its own copy
    assert torch.equal(lb1.apply(x, base[:, :32].contiguous(), b), y)
    lb1.clear(0)
    with pytest.raises(ValueError, match="from_padded"):
        lb1.set(0, LoraLayer(torch.randn(2, 64), torch.randn(32, 2), 1.0))
    bad = LoRABatch(3, b.tokens, b.weights.double(), b.segments, b.max_count, b.ids)
    with pytest.raises(TypeError, match="weights"):
        apply_slices([lb2, lb2], torch.randn(3, 8), torch.randn(3, 32), bad)
