"""AWQ (lorakern.quant.awq, lorakern.models.awq): the searches against their definitions on explicit
activations, the folds on Llama- and Gemma-style models, the statistics of the scaled model, and quantize_model
with methods "awq" and "gwq_awq"; Gemma's scaled embedding behind a quantized tied head; BOS-led token windows."""
import copy

import pytest
import torch
from torch import nn

import lorakern
from lorakern.models import load_quantized_model, save_quantized_model
from lorakern.models.awq import _scaled_stats, apply_awq, awq_groups
from lorakern.nn import QuantEmbedding
from lorakern.quant import collect_statistics
from lorakern.quant.awq import awq_scales, clip_weight, fake_quantize, search_clip, search_scales
from lorakern.quant.rtn import quantize_rtn


def salient_problem(N=48, K=256, T=1024, seed=0, salient=4, boost=30.0):
    """A layer whose inputs have a few channels ``boost`` times larger than the rest (LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, K, generator=g)
    X[:, :salient] *= boost
    W = torch.randn(N, K, generator=g) * 0.05
    return W, X


def err_on(X, W, Wq):
    """Mean over tokens of the summed squared output error, times 2 (the Hessian's normalisation)."""
    return float(((X @ (Wq - W).t()) ** 2).sum() * 2 / X.shape[0])


def hessian_of(X):
    return 2 * X.t() @ X / X.shape[0]


def test_fake_quantize_is_what_rtn_stores():
    W, _ = salient_problem(N=17, K=128, seed=1)
    for bits in (2, 3, 4, 8):
        for g in (32, 64, 128):
            assert torch.equal(fake_quantize(W, bits, g), quantize_rtn(W, bits, g).dequantize(torch.float32))


def test_search_scales_errors_match_the_outputs_on_explicit_activations():
    W, X = salient_problem(seed=2)
    W2 = torch.randn(20, W.shape[1]) * 0.1
    s, alpha, errors = search_scales([W, W2], hessian_of(X), X.abs().mean(0), 3, 64)
    assert len(errors) == 20
    for i in (0, 5, 13):
        si = awq_scales(X.abs().mean(0), i / 20)
        direct = sum(err_on(X, w, fake_quantize(w * si, 3, 64) / si) for w in (W, W2))
        assert errors[i] == pytest.approx(direct, rel=1e-3)
    assert errors[0] == pytest.approx(err_on(X, W, fake_quantize(W, 3, 64)) + err_on(X, W2, fake_quantize(W2, 3, 64)),
                                      rel=1e-3)  # alpha = 0 is RTN
    assert min(errors) == errors[int(round(alpha * 20))]
    assert torch.equal(s, awq_scales(X.abs().mean(0), alpha))


def test_search_scales_protects_salient_channels():
    W, X = salient_problem(seed=3)
    s, alpha, errors = search_scales([W], hessian_of(X), X.abs().mean(0), 3, 128)
    assert alpha > 0
    assert min(errors) < 0.7 * errors[0]  # much better than RTN on these activations
    assert s[:4].min() > s[4:].max()      # the salient channels get the largest scales


def test_search_scales_with_uniform_activations_is_rtn():
    W, X = salient_problem(seed=4, boost=1.0)
    s, alpha, errors = search_scales([W], hessian_of(X), torch.full((W.shape[1],), 0.8), 4, 64)
    assert alpha == 0.0 and torch.equal(s, torch.ones_like(s))
    assert max(errors) == pytest.approx(min(errors), rel=1e-6)


def test_search_scales_refuses_bad_input():
    W, X = salient_problem(K=128, seed=5)
    H, a = hessian_of(X), X.abs().mean(0)
    with pytest.raises(ValueError, match="must agree"):
        search_scales([W[:, :64]], H, a, 4, 64)
    with pytest.raises(ValueError, match="at least one"):
        search_scales([], H, a, 4, 64)
    bad = H.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        search_scales([W], bad, a, 4, 64)


@pytest.mark.parametrize("exclude", [False, True])
def test_search_clip_picks_the_best_ratio_of_each_group(exclude):
    W, X = salient_problem(N=12, K=128, seed=6, boost=1.0)
    W[0, 5] = 1.0  # a group with one large weight: clipping it pays
    mask = torch.zeros_like(W, dtype=torch.bool)
    if exclude:
        mask[3, 7] = mask[0, 100] = True
    ex = mask if exclude else None
    best = search_clip(W, hessian_of(X), 3, 32, ex)
    org = W.abs().masked_fill(mask, 0).reshape(12, 4, 32).amax(-1)
    assert (best <= org + 1e-7).all() and (best >= 0.55 * org - 1e-7).all()
    Wc = clip_weight(W, best, 32, ex)
    assert torch.equal(Wc[mask], W[mask])
    # brute force per (row, group) on the explicit activations
    for n, g in [(0, 0), (3, 0), (5, 2), (11, 3)]:
        cols = slice(g * 32, (g + 1) * 32)
        errs = []
        for i in range(10):
            m = org.clone()
            m[n, g] = org[n, g] * (1 - i / 20)
            q = fake_quantize(clip_weight(W, m, 32, ex), 3, 32, ex)
            errs.append(float(((X[:, cols] @ (q[n, cols] - W[n, cols])) ** 2).sum()))
        assert float(best[n, g]) == pytest.approx(float(org[n, g]) * (1 - errs.index(min(errs)) / 20), rel=1e-5)
    assert float(best[0, 0]) < float(org[0, 0])


def tiny(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    else:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig
        cfg = Gemma3TextConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
        model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # outlier channels, as trained LLMs have: the norms scale a few channels up
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight"):
                p.add_(torch.rand(p.shape) * 0.5)
                p[:3] += 8.0
    return model.eval()


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_groups_fold_and_scaled_statistics(kind):
    model = tiny(kind)
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    names = linear_names(model)
    groups = awq_groups(model)
    kinds = {(g.producer.rsplit(".", 1)[-1], tuple(c.rsplit(".", 1)[-1] for c in g.consumers)) for g in groups}
    ln2 = "pre_feedforward_layernorm" if kind == "gemma3" else "post_attention_layernorm"
    assert kinds == {("input_layernorm", ("q_proj", "k_proj", "v_proj")), (ln2, ("gate_proj", "up_proj")),
                     ("up_proj", ("down_proj",))}  # GQA: no v -> o group
    assert len(groups) == 6
    stats = collect_statistics(model, ids, names, gradients=True, grad_squares=True, act_means=True, progress=False)
    ref = model(ids).logits
    new_stats, record = apply_awq(model, {n: 64 for n in names}, stats, 3, 64)
    assert all(r["alpha"] > 0 for r in record.values()), record  # the outlier channels are protected
    assert all(r["awq_error"] < r["rtn_error"] for r in record.values())
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)  # the model's function is unchanged
    assert stats[names[0]] is not new_stats[names[0]]  # the caller's statistics are left alone
    again = collect_statistics(model, ids, names, gradients=True, grad_squares=True, act_means=True, progress=False)
    for n in names:
        a, b = new_stats[n], again[n]
        torch.testing.assert_close(a.act_mean, b.act_mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.hessian, b.hessian, rtol=1e-3, atol=1e-4 * float(b.hessian.abs().max()))
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4 * float(b.grad.abs().max()))
        torch.testing.assert_close(a.grad_sq, b.grad_sq, rtol=1e-3, atol=1e-4 * float(b.grad_sq.abs().max()))


def test_fold_into_an_unknown_norm_is_refused_and_leaves_the_model_alone(caplog):
    class OddNorm(nn.Module):  # output not proportional to its weight: x * w + 1
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x):
            return x * self.weight + 1

    model = tiny("llama")
    for layer in model.model.layers:
        layer.input_layernorm = OddNorm(128)
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(2))
    names = linear_names(model)
    stats = collect_statistics(model, ids, names, gradients=False, act_means=True, progress=False)
    ref = model(ids).logits
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    _, record = apply_awq(model, {n: 64 for n in names}, stats, 3, 64)
    assert "not divided" in record["model.layers.0.input_layernorm"]["skipped"]
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def calib_logit_error(model, ref_model, ids):
    with torch.no_grad():
        return float((model(ids).logits - ref_model(ids).logits).square().mean())


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_quantize_model_awq_beats_rtn_and_saves(kind, tmp_path):
    model = tiny(kind, seed=3)
    cal = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(3))
    errs = {}
    for method in ("rtn", "awq", "gwq_awq"):
        qm = lorakern.quantize_model(copy.deepcopy(model), bits=3, group_size=32, method=method, head_bits=None,
                                     calibration=None if method == "rtn" else cal, progress=False)
        errs[method] = calib_logit_error(qm, model, cal)
        if method != "rtn":
            rec = qm.lorakern_quantization
            assert rec["method"] == method and rec["dense"] == "awq" and len(rec["awq"]) == 6
    assert errs["awq"] < 0.8 * errs["rtn"], errs
    assert errs["gwq_awq"] < errs["awq"], errs
    qm = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=32, method="awq", calibration=cal,
                                 progress=False)  # with the 8-bit tied head
    save_quantized_model(qm, tmp_path / "q")
    back = load_quantized_model(tmp_path / "q")
    torch.testing.assert_close(back(cal).logits, qm(cal).logits, rtol=0, atol=0)


def test_quantize_model_awq_gptq_and_errors():
    model = tiny("llama", seed=4)
    cal = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(4))
    qm = lorakern.quantize_model(copy.deepcopy(model), bits=3, group_size=32, method="awq", dense="awq_gptq",
                                 calibration=cal, head_bits=None, progress=False)
    assert qm.lorakern_quantization["dense"] == "awq_gptq"
    assert calib_logit_error(qm, model, cal) < calib_logit_error(
        lorakern.quantize_model(copy.deepcopy(model), bits=3, group_size=32, head_bits=None, progress=False), model, cal)
    with pytest.raises(ValueError, match="needs calibration"):
        lorakern.quantize_model(copy.deepcopy(model), bits=3, method="awq")
    with pytest.raises(ValueError, match="unknown dense quantizer"):
        lorakern.QuantConfig(method="gwq", dense="awq2")
    names = linear_names(model)
    no_means = collect_statistics(model, cal, names, gradients=False, progress=False)
    with pytest.raises(ValueError, match="statistics lack"):
        lorakern.quantize_model(copy.deepcopy(model), bits=3, method="awq", statistics=no_means, progress=False)


def test_scaled_stats_rows_and_cols():
    from lorakern.quant import LayerStats
    st = LayerStats(grad=torch.ones(3, 4), grad_sq=torch.ones(3, 4), hessian=torch.ones(4, 4),
                    act_mean=torch.ones(4), nsamples=1, tokens=5)
    out = _scaled_stats(st, cols=torch.tensor([1.0, 2.0, 4.0, 1.0]), rows=torch.tensor([2.0, 1.0, 1.0]))
    assert out.grad[0].tolist() == [2.0, 1.0, 0.5, 2.0] and out.grad[1].tolist() == [1.0, 0.5, 0.25, 1.0]
    assert out.hessian[1, 2] == 1 / 8 and out.act_mean.tolist() == [1.0, 0.5, 0.25, 1.0] and out.tokens == 5


def test_gemma_scaled_embedding_behind_a_quantized_tied_head(tmp_path):
    model = tiny("gemma3", seed=5)
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(5))
    assert QuantEmbedding.scale_of(model.model.embed_tokens) == pytest.approx(128 ** 0.5)
    with torch.no_grad():
        ref_rows = model.model.embed_tokens(ids)
    qm = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=32, head_bits=8, progress=False)
    emb = qm.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and emb.scale == pytest.approx(128 ** 0.5)
    head = qm.lm_head.quantized_weight.dequantize(torch.float32)
    expect = head[ids] * torch.tensor(emb.scale)
    torch.testing.assert_close(emb(ids), expect, rtol=0, atol=0)
    torch.testing.assert_close(emb(ids), ref_rows, rtol=0.02, atol=0.02 * float(ref_rows.abs().max()))
    save_quantized_model(qm, tmp_path / "g")
    back = load_quantized_model(tmp_path / "g")
    assert back.get_input_embeddings().scale == emb.scale
    torch.testing.assert_close(back(ids).logits, qm(ids).logits, rtol=0, atol=0)


def test_embedding_that_is_not_a_scaled_lookup_keeps_its_float_table():
    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    model = tiny("llama", seed=6)
    odd = Shifted(101, 128)
    odd.weight = model.lm_head.weight  # tied
    model.model.embed_tokens = odd
    with pytest.raises(ValueError, match="constant multiple"):
        QuantEmbedding.scale_of(odd)
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(6))
    before = odd(ids)
    qm = lorakern.quantize_model(model, bits=4, group_size=32, head_bits=8, progress=False)
    assert qm.get_input_embeddings() is odd and "embedding_kept" in qm.lorakern_quantization["head"]
    torch.testing.assert_close(odd(ids), before, rtol=0, atol=0)


class FakeTokenizer:
    def __init__(self, bos):
        self.bos_token_id = 1 if bos else None
        self.bos = bos

    def __call__(self, text, return_tensors=None):
        ids = [10 + (ord(c) % 50) for c in text]
        ids = ([1] if self.bos else []) + ids
        return type("E", (), {"input_ids": torch.tensor([ids])})()


def test_token_windows_start_with_bos_when_the_tokenizer_adds_it():
    from lorakern.data.wikitext import token_windows
    text = "abcdefghijklmnopqrstuvwxyz" * 3
    plain = token_windows(FakeTokenizer(False), text, 8, 3)
    enc = FakeTokenizer(False)(text).input_ids[0]
    assert torch.equal(plain.reshape(-1), enc[:24])
    lead = token_windows(FakeTokenizer(True), text, 8, 3)
    assert (lead[:, 0] == 1).all()
    assert torch.equal(lead[:, 1:].reshape(-1), enc[:21])  # the text continues without overlap or gap
    with pytest.raises(ValueError, match="needed"):
        token_windows(FakeTokenizer(True), "abc", 8, 3)
