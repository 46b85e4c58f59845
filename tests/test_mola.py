"""MoLA: the served path (router -> device-side LoRABatch -> one multi_lora call) against the per-expert loop
reference (random routers, ties, experts of different ranks, E = 1, k = E; every ISA; Triton in the
interpreter), the training path against the served one and its gradients against autograd through the
reference, training on a tiny model, save/load of dense and compressed files, and malformed files refused."""
import json

import pytest
import torch

from lorakern.adapters import (apply_mola, attach_mola, compress_mola_adapter, detach_mola, is_mola_adapter,
                               load_compressed_adapter, load_mola_adapter, save_compressed_mola, save_mola_adapter)
from lorakern.apps.train import MoLATrainConfig, TrainableMoLA, get_task, train_mola_adapter
from lorakern.apps.train.trainer import answer_loss, encode_examples, mixture_examples
from lorakern.formats import FormatError
from lorakern.formats.lora import LoraLayer
from lorakern.formats.mola import ALLOCATIONS, MoLAAdapter, MoLAConfig, MoLALayer, allocate_experts
from lorakern.multilora import LayerBank, LoRABatch
from lorakern.nn import MoLALinear
from lorakern.nn.mola_linear import mixture_batch, mola_expert_loop, route_top_k
from lorakern.ops import reference as ref
from lorakern.testing import EPS, char_tokenizer, multi_lora_int8_act, random_compressed, tiny_llama

N, K = 72, 96  # odd-ish sizes; K a multiple of 32 for compressed experts


def random_layer(rng, ranks, N=N, K=K, router_scale=1.0, dtype=torch.float32):
    experts = [LoraLayer((torch.randn(r, K, generator=rng) * 0.2).to(dtype), (torch.randn(N, r, generator=rng) * 0.2).to(dtype),
                         2.0 / r) for r in ranks]
    return MoLALayer(torch.randn(len(ranks), K, generator=rng) * router_scale, experts)


def rounded(layer, dtype):
    """The layer with its experts rounded to the bank's storage dtype (what the kernel reads)."""
    return MoLALayer(layer.router, [LoraLayer(e.A.to(dtype), e.B.to(dtype), e.scale) for e in layer.experts])


@pytest.mark.parametrize("ranks,k", [([3, 8, 1, 4, 16], 2), ([5], 2), ([4, 4, 7], 3), ([2, 6, 3, 9, 1, 5, 8, 4], 1)])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float16])
def test_kernel_path_matches_expert_loop(isa, ranks, k, bank_dtype, rng):
    layer = random_layer(rng, ranks)
    want_layer = rounded(layer, bank_dtype)
    for xdt in (torch.float32, torch.float16, torch.bfloat16):
        base = torch.nn.Linear(K, N).to(xdt)
        m = MoLALinear(base, layer, top_k=k, dtype=bank_dtype)
        assert m.top_k == min(k, len(ranks))
        for T in (1, 7, 41):
            x = torch.randn(T, K, generator=rng).to(xdt)
            with torch.no_grad():
                y = m(x)
                b = base(x)
            want = mola_expert_loop(x, b, want_layer, k)
            tol = (8 * EPS[torch.float32] + 2 * EPS[xdt]) * (want.abs() + 1) * 4
            assert y.dtype == xdt and y.shape == (T, N)
            assert ((y.double() - want).abs() <= tol).all(), (xdt, float((y.double() - want).abs().max()))


def test_half_model_and_bad_calls(rng):
    layer = random_layer(rng, [4, 4, 4])
    m = MoLALinear(torch.nn.Linear(K, N), layer, dtype=torch.float16).half()
    x = torch.randn(5, K, generator=rng).half()
    with torch.no_grad():
        y = m(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="route_top_k takes"):
        route_top_k(torch.randn(2, 3, K), layer.router, 2)
    with pytest.raises(ValueError, match="NaN"):
        with torch.no_grad():
            m(torch.full((2, K), float("nan"), dtype=torch.float16))


def test_leading_dims_and_empty(rng):
    layer = random_layer(rng, [4, 4, 4])
    base = torch.nn.Linear(K, N)
    m = MoLALinear(base, layer)
    x = torch.randn(2, 5, K, generator=rng)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 5, N)
        assert torch.allclose(y.reshape(10, N), m(x.reshape(10, K)))
        assert m(torch.zeros(0, K)).shape == (0, N)


def test_compressed_experts_match_int8_model(isa, rng):
    E, Nc = 4, 160  # compressed experts need N divisible by a group size
    experts = [random_compressed(Nc, K, r, h, 3, 32, 32, rng, scale=0.5) for r, h in ((8, 2), (4, 4), (6, 0), (16, 5))]
    layer = MoLALayer(torch.randn(E, K, generator=rng), experts)
    base = torch.nn.Linear(K, Nc)
    m = MoLALinear(base, layer, top_k=2)
    x = torch.randn(23, K, generator=rng)
    with torch.no_grad():
        y, b = m(x), base(x)
    ids, w = route_top_k(x, layer.router, 2)
    batch = mixture_batch(ids, w, E)
    want = multi_lora_int8_act(x, b, *m.bank.op_args(), batch.segments, batch.tokens, batch.weights, m.bank.max_rank())
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # and the per-expert loop over the dequantized experts (fp activations): within the int8 activation noise
    deq = []
    for e in range(E):
        _, A, Bt, _ = ref.bank_factors(m.bank.slabs(), m.bank.table, e, m.bank.group_a, m.bank.group_b)
        deq.append(LoraLayer(A, Bt.t(), experts[e].scale))
    loop = mola_expert_loop(x, b, MoLALayer(layer.router, deq), 2)
    assert float((y.double() - loop).norm() / (loop - b.double()).norm()) < 0.02


def test_routing_ties_and_weights(rng):
    router = torch.zeros(5, K)
    router[3] = 1.0  # experts 0, 1, 2, 4 tie (equal logits)
    x = torch.randn(9, K, generator=rng).abs()
    ids, w = route_top_k(x, router, 3)
    assert (ids[:, 0] == 3).all() and (ids[:, 1] == 0).all() and (ids[:, 2] == 1).all()  # ties: lower index
    assert torch.allclose(w.sum(-1), torch.ones(9))
    assert torch.allclose(w[:, 1], w[:, 2])
    with pytest.raises(ValueError, match="top_k"):
        route_top_k(x, router, 6)
    # ties go the same way in the served path and the loop
    layer = random_layer(rng, [3, 3, 3, 3, 3])
    layer.router = router
    m = MoLALinear(torch.nn.Linear(K, N), layer, top_k=3, dtype=torch.float32)
    with torch.no_grad():
        y, b = m(x), m.base(x)
    assert torch.allclose(y.double(), mola_expert_loop(x, b, layer, 3), rtol=1e-5, atol=1e-5)


def test_mixture_batch_equals_host_batch(rng):
    E, T, k = 6, 17, 2
    ids, w = route_top_k(torch.randn(T, K, generator=rng), torch.randn(E, K, generator=rng), k)
    b = mixture_batch(ids, w, E)
    h = LoRABatch.from_ids(ids, w)
    assert b.segments[:, 2].sum() == T * k and (b.segments[:, 0] == torch.arange(E)).all()
    nz = b.segments[:, 2] > 0
    assert torch.equal(b.segments[nz], h.segments)  # the same entries in the same order; empty segments added
    assert torch.equal(b.tokens, h.tokens) and torch.equal(b.weights, h.weights) and b.mixture
    lb = LayerBank(N, K, torch.float32)
    for e in range(E):
        lb.set(e, LoraLayer(torch.randn(4, K, generator=rng), torch.randn(N, 4, generator=rng), 1.0))
    x, base = torch.randn(T, K, generator=rng), torch.randn(T, N, generator=rng)
    assert torch.allclose(lb.apply(x, base, b), lb.apply(x, base, h), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (0, 4, 2), (37, 8, 2), (9, 5, 5), (64, 6, 3)])
def test_cpp_routing_equals_torch_routing(T, E, k, rng):
    from lorakern.ops.registry import eager_helper
    logits = torch.randn(T, E, generator=rng)
    if T > 3:
        logits[1] = 0.5   # every expert ties
        logits[2, :2] = logits[2, 2:4].max()  # partial ties with the maximum
        logits[3, 0], logits[3, 1] = 9.0, 9.0 + 1e-6  # distinct logits whose probabilities round to one value
    seg, tok, w = eager_helper("route_top_k")(logits, k)
    ids, w_ = route_top_k(logits, torch.eye(E), k)  # the torch path on the same logits (x = logits, R = I)
    want = mixture_batch(ids, w_, E)
    if T > 3 and E > 1:
        assert ids[3, 0] == 1  # ranked by logits, not by their (equal) probabilities
    assert torch.equal(seg, want.segments) and torch.equal(tok, want.tokens)
    assert torch.allclose(w, want.weights, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="top_k"):
        eager_helper("route_top_k")(logits, E + 1)
    if T:
        logits[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            eager_helper("route_top_k")(logits, k)


def test_triton_interpreter_takes_the_device_batch(rng):
    from lorakern.triton.multi_lora import multi_lora_triton
    layer = random_layer(rng, [4, 8, 2, 16])
    m = MoLALinear(torch.nn.Linear(K, N), layer, top_k=2)
    x = torch.randn(13, K, generator=rng)
    ids, w = route_top_k(x, layer.router, 2)
    b = mixture_batch(ids, w, 4)
    base = torch.randn(13, N, generator=rng)
    y = multi_lora_triton(x, base, *m.bank.op_args(), b.segments, b.tokens, b.weights, m.bank.max_rank(),
                          b.max_count, b.mixture)
    want = mola_expert_loop(x, base, rounded(layer, torch.float16), 2)
    assert torch.allclose(y.double(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    # an expert nobody chose: its empty segment launches blocks that must add nothing
    ids = torch.stack([torch.tensor([0, 2, 3])[torch.randperm(3, generator=rng)[:2]] for _ in range(13)])
    b = mixture_batch(ids, torch.rand(13, 2, generator=rng), 4)
    assert int(b.segments[1, 2]) == 0
    y = multi_lora_triton(x, base, *m.bank.op_args(), b.segments, b.tokens, b.weights, m.bank.max_rank(),
                          b.max_count, b.mixture)
    want = ref.multi_lora(x, base, *m.bank.op_args(), b.segments, b.tokens, b.weights, m.bank.max_rank()).double()
    assert torch.allclose(y.double(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_training_path_equals_served_path_and_gradients(rng):
    torch.manual_seed(0)
    base = torch.nn.Linear(K, N).double()
    for p in base.parameters():
        p.requires_grad_(False)
    tm = TrainableMoLA(base, 5, 4, 8.0, 2, torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        tm.B.normal_(0, 0.3)
    x = torch.randn(11, K, generator=rng, dtype=torch.float64, requires_grad=True)
    tm.train()
    y = tm(x)
    # the served path (fp32 bank) computes the same function
    served = MoLALinear(torch.nn.Linear(K, N), tm.to_layer(), 2, dtype=torch.float32)
    served.base.load_state_dict({k: v.float() for k, v in base.state_dict().items()})
    with torch.no_grad():
        ys = served(x.detach().float())
    assert torch.allclose(ys.double(), y.detach(), rtol=1e-5, atol=1e-5)
    # gradients of router, experts and x against autograd through the per-expert loop (fp64)
    g = torch.randn_like(y)
    gx, gr, gA, gB = torch.autograd.grad((y * g).sum(), (x, tm.router, tm.A, tm.B))
    router = tm.router.detach().clone().requires_grad_(True)
    As = [tm.A[e * 4:(e + 1) * 4].detach().clone().requires_grad_(True) for e in range(5)]
    Bs = [tm.B[:, e * 4:(e + 1) * 4].detach().clone().requires_grad_(True) for e in range(5)]
    x2 = x.detach().clone().requires_grad_(True)
    loop = mola_expert_loop(x2, base(x2), MoLALayer(router, [LoraLayer(a, b, 2.0) for a, b in zip(As, Bs)]), 2)
    # an expert no token is routed to is not in the loop's graph (11 tokens, top-2 of 5: it happens for some draws
    # of x): its gradient is zero, which the training path must give too
    params = (x2, router, *As, *Bs)
    grads = torch.autograd.grad((loop * g).sum(), params, allow_unused=True)
    rx, rr, *rab = [torch.zeros_like(p) if gr_ is None else gr_ for p, gr_ in zip(params, grads)]
    assert torch.allclose(gx, rx, rtol=1e-9, atol=1e-10) and torch.allclose(gr, rr, rtol=1e-9, atol=1e-10)
    assert torch.allclose(gA, torch.cat(rab[:5]), rtol=1e-9, atol=1e-10)
    assert torch.allclose(gB, torch.cat(rab[5:], 1), rtol=1e-9, atol=1e-10)
    # the Switch load-balancing term: E * sum_e (fraction of routing slots on e) * (mean probability of e)
    ids, _, probs = route_top_k(x.detach(), tm.router.detach(), 2, return_probs=True)
    frac = torch.bincount(ids.reshape(-1), minlength=5).double() / ids.numel()
    assert torch.allclose(tm.aux.detach(), 5 * (frac * probs.mean(0)).sum())


def test_allocations():
    assert allocate_experts("2-4-6-8", 30) == [2] * 8 + [4] * 8 + [6] * 7 + [8] * 7
    assert allocate_experts(ALLOCATIONS["8-2-2-8"], 4) == [8, 2, 2, 8]
    assert allocate_experts([3, 1], 3) == [3, 3, 1]
    for bad in ("2-x", [0, 2], []):
        with pytest.raises(ValueError):
            allocate_experts(bad, 8)
    with pytest.raises(ValueError):
        allocate_experts("1-2-3", 2)


@pytest.fixture(scope="module")
def trained():
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok), num_hidden_layers=4, max_position_embeddings=128)
    tasks = [get_task("reverse"), get_task("sort")]
    probe = encode_examples(tok, mixture_examples(tasks, 16, 77))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        l0 = float(answer_loss(model, *probe))
    cfg = MoLATrainConfig(steps=25, batch_size=8, lr=3e-3, allocation="1-2-3-4", rank=4, alpha=8.0)
    ad = train_mola_adapter(model, tok, tasks, cfg, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model unchanged
    assert all(p.requires_grad for p in model.parameters())
    return tok, model, tasks, probe, l0, ad


def test_training_lowers_loss_and_is_reproducible(trained):
    tok, model, tasks, probe, l0, ad = trained
    assert ad.config.experts_per_layer == (1, 2, 3, 4) and ad.config.top_k == 2
    assert [len(ad.layers[f"model.layers.{i}.self_attn.q_proj"].experts) for i in range(4)] == [1, 2, 3, 4]
    with apply_mola(model, ad, dtype=torch.float32), torch.no_grad():
        l1 = float(answer_loss(model, *probe))
    assert l1 < l0 - 0.3, (l0, l1)
    cfg = MoLATrainConfig(steps=2, batch_size=4, allocation="1-2-3-4", rank=4, alpha=8.0)
    a1 = train_mola_adapter(model, tok, tasks, cfg, progress=False)
    a2 = train_mola_adapter(model, tok, tasks, cfg, progress=False)
    n = "model.layers.3.mlp.down_proj"
    assert torch.equal(a1.layers[n].router, a2.layers[n].router)
    assert torch.equal(a1.layers[n].experts[2].B, a2.layers[n].experts[2].B)


def test_save_load_compress_and_serve(trained, tmp_path):
    tok, model, tasks, probe, l0, ad = trained
    d = save_mola_adapter(ad, tmp_path / "mola")
    assert is_mola_adapter(d) and json.loads((d / "mola_config.json").read_text())["top_k"] == 2
    back = load_mola_adapter(d)
    assert back.config == ad.config and set(back.layers) == set(ad.layers)
    n = "model.layers.2.self_attn.v_proj"
    assert torch.equal(back.layers[n].router, ad.layers[n].router)
    assert torch.equal(back.layers[n].experts[1].A, ad.layers[n].experts[1].A)
    ids = probe[0][:3, :24]
    with apply_mola(model, ad, dtype=torch.float32), torch.no_grad():
        want = model(ids).logits
    with apply_mola(model, d, dtype=torch.float32), torch.no_grad():
        assert torch.allclose(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    c = compress_mola_adapter(back, rho=0.9, bits_high=3, group_size=32)
    save_compressed_mola(tmp_path / "c.safetensors", c)
    assert is_mola_adapter(tmp_path / "c.safetensors")
    c2 = load_mola_adapter(tmp_path / "c.safetensors")
    assert c2.config == ad.config and all(l.compressed for l in c2.layers.values())
    with apply_mola(model, c2), torch.no_grad():
        lc = float(answer_loss(model, *probe))
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 28) and lc < l0
    with pytest.raises(FormatError, match="load_mola_adapter"):
        load_compressed_adapter(tmp_path / "c.safetensors")
    # the CLI compresses a MoLA directory too
    from lorakern.cli import main
    assert main(["compress-adapter", str(d), str(tmp_path / "cli.safetensors"), "--group-size", "32"]) == 0
    assert load_mola_adapter(tmp_path / "cli.safetensors").layers[n].compressed


def test_attach_checks_and_save_pretrained_refused(trained, tmp_path):
    tok, model, tasks, probe, l0, ad = trained
    old = attach_mola(model, ad)
    try:
        with pytest.raises(ValueError, match="already"):
            attach_mola(model, ad)
        with pytest.raises(ValueError, match="adapters attached"):
            model.save_pretrained(tmp_path / "m")
        from lorakern.adapters import attach_adapter
        n = "model.layers.0.self_attn.q_proj"
        with pytest.raises(ValueError, match="already carries an adapter"):  # no LoRA stacked on a MoLA layer
            attach_adapter(model, {n: LoraLayer(torch.zeros(2, 64), torch.zeros(64, 2), 1.0)})
    finally:
        detach_mola(model, old)
    assert not any(isinstance(m, MoLALinear) for m in model.modules())
    other = MoLAAdapter(ad.config, {"model.layers.9.mlp.up_proj": next(iter(ad.layers.values()))})
    with pytest.raises(ValueError):
        attach_mola(model, other)


def test_quantized_base(trained):
    from lorakern.models import quantize_model, QuantConfig
    tok, model, tasks, probe, l0, ad = trained
    import copy
    qm = quantize_model(copy.deepcopy(model), QuantConfig(bits=8, group_size=32, head_bits=None))
    ids = probe[0][:2, :20]
    with apply_mola(model, ad, dtype=torch.float32), torch.no_grad():
        want = model(ids).logits
    with apply_mola(qm, ad, dtype=torch.float32), torch.no_grad():
        got = qm(ids).logits
    assert float((got - want).norm() / want.norm()) < 0.05


def _write_dense(tmp_path, ad, mutate_tensors=None, mutate_cfg=None):
    from safetensors.torch import load_file, save_file
    d = save_mola_adapter(ad, tmp_path / "m")
    if mutate_tensors:
        t = load_file(str(d / "mola_model.safetensors"))
        mutate_tensors(t)
        save_file(t, str(d / "mola_model.safetensors"))
    if mutate_cfg:
        c = json.loads((d / "mola_config.json").read_text())
        mutate_cfg(c)
        (d / "mola_config.json").write_text(json.dumps(c))
    return d


@pytest.mark.parametrize("case", ["missing_B", "router_shape", "nan", "stray", "int_tensor", "count", "top_k",
                                  "version", "unknown_field", "alloc_type", "not_json", "truncated", "gap"])
def test_malformed_files_refused(trained, tmp_path, case):
    ad = trained[5]
    n = "model.layers.1.self_attn.q_proj"
    muts = {
        "missing_B": dict(mutate_tensors=lambda t: t.pop(f"{n}.experts.1.lora_B.weight")),
        "router_shape": dict(mutate_tensors=lambda t: t.__setitem__(f"{n}.router.weight", torch.zeros(3, 64))),
        "nan": dict(mutate_tensors=lambda t: t[f"{n}.experts.0.lora_A.weight"].__setitem__((0, 0), float("nan"))),
        "stray": dict(mutate_tensors=lambda t: t.__setitem__("lm_head.weight", torch.zeros(2, 2))),
        "int_tensor": dict(mutate_tensors=lambda t: t.__setitem__(f"{n}.router.weight", torch.zeros(2, 64, dtype=torch.int32))),
        "count": dict(mutate_cfg=lambda c: c.__setitem__("experts_per_layer", [1, 3, 3, 4])),
        "top_k": dict(mutate_cfg=lambda c: c.__setitem__("top_k", 0)),
        "version": dict(mutate_cfg=lambda c: c.__setitem__("format_version", 99)),
        "unknown_field": dict(mutate_cfg=lambda c: c.__setitem__("use_dora", True)),
        "alloc_type": dict(mutate_cfg=lambda c: c.__setitem__("experts_per_layer", "1-2-3-4")),
        "gap": dict(mutate_tensors=lambda t: [t.__setitem__(f"{n}.experts.5.lora_{p}.weight", t.pop(f"{n}.experts.1.lora_{p}.weight")) for p in "AB"]),
    }
    if case == "not_json":
        d = _write_dense(tmp_path, ad)
        (d / "mola_config.json").write_text("{not json")
    elif case == "truncated":
        d = _write_dense(tmp_path, ad)
        p = d / "mola_model.safetensors"
        p.write_bytes(p.read_bytes()[:1000])
    else:
        d = _write_dense(tmp_path, ad, **muts[case])
    with pytest.raises(FormatError):
        load_mola_adapter(d)


def test_compressed_file_damage_refused(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    ad = trained[5]
    c = compress_mola_adapter(ad, group_size=32)
    p = tmp_path / "c.safetensors"
    save_compressed_mola(p, c)
    with safe_open(str(p), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["mola_config"])
    cfg["experts_per_layer"] = [2, 2, 3, 4]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "mola_config": json.dumps(cfg)})
    with pytest.raises(FormatError, match="experts"):
        load_mola_adapter(tmp_path / "bad.safetensors")
    tensors.pop("model.layers.0.mlp.up_proj.router.weight")
    save_file(tensors, str(tmp_path / "bad2.safetensors"), metadata=meta)
    with pytest.raises(FormatError):
        load_mola_adapter(tmp_path / "bad2.safetensors")
    with pytest.raises(ValueError, match="compressed"):
        save_mola_adapter(c, tmp_path / "x")
    with pytest.raises(ValueError, match="not compressed"):
        save_compressed_mola(tmp_path / "y.safetensors", ad)


def test_bad_config_and_layers():
    with pytest.raises(ValueError):
        MoLAConfig((2, 0), ("q_proj",))
    with pytest.raises(ValueError):
        MoLAConfig((2,), ())
    rng = torch.Generator().manual_seed(0)
    layer = random_layer(rng, [2, 3])
    layer.router = torch.zeros(3, K)
    with pytest.raises(ValueError, match="router"):
        MoLALinear(torch.nn.Linear(K, N), layer)
    with pytest.raises(ValueError, match="does not match"):
        MoLALinear(torch.nn.Linear(K, N + 1), random_layer(rng, [2]))


def test_compile_no_graph_breaks(rng):
    torch._dynamo.reset()
    m = MoLALinear(torch.nn.Linear(K, N), random_layer(rng, [4, 8, 2]), top_k=2, dtype=torch.float32)
    x = torch.randn(9, K, generator=rng)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, fullgraph=True, dynamic=False)(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def random_mola(model, allocation, rank=4, std=0.3, seed=0) -> MoLAAdapter:
    """A random MoLA adapter on every projection of ``model`` (B non-zero, so the experts matter)."""
    from lorakern.apps.train import DEFAULT_TARGETS
    from lorakern.formats.mola import layer_index
    g = torch.Generator().manual_seed(seed)
    counts = allocate_experts(allocation, model.config.num_hidden_layers)
    layers = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in DEFAULT_TARGETS and ".layers." in n:
            E = counts[layer_index(n)]
            layers[n] = MoLALayer(torch.randn(E, m.in_features, generator=g),
                                  [LoraLayer(torch.randn(rank, m.in_features, generator=g) * std / m.in_features ** 0.5,
                                             torch.randn(m.out_features, rank, generator=g) * std, 2.0 / rank)
                                   for _ in range(E)])
    return MoLAAdapter(MoLAConfig(tuple(counts), DEFAULT_TARGETS, rank, 2.0, 2), layers)


def test_compiled_decode_with_mola_matches_eager():
    """prepare_decode (static cache, fullgraph torch.compile: a graph break fails) of a quantized model with a MoLA
    adapter: the compiled graph routes with torch ops, eager with the C++ router; same tokens and logits."""
    import copy

    import lorakern
    model = tiny_llama(seed=3, vocab_size=160, hidden_size=128, intermediate_size=256)
    q = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=64, progress=False)
    ids = torch.randint(3, 160, (2, 7), generator=torch.Generator().manual_seed(0))

    def gen(m):
        out = m.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits)
    with torch.no_grad():
        base_toks, base_logits = gen(q)
        attach_mola(q, random_mola(model, [2, 3]), dtype=torch.float32)
        lorakern.prepare_decode(q, compile=False)
        toks, logits = gen(q)
        torch._dynamo.reset()
        lorakern.prepare_decode(q)
        c_toks, c_logits = gen(q)
    assert torch.equal(c_toks, toks) and (c_logits - logits).abs().max() < 1e-4
    assert (logits - base_logits).abs().max() > 0.1  # the experts do change the output
