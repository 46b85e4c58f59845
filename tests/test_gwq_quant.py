"""GWQ algorithms: calibration statistics, outlier scores and budgets, GPTQ,
the outlier-aware quantizer, GWQLinear, quantize_model methods and model directories."""
import json

import pytest
import torch
from torch import nn

import lorakern
from lorakern.formats import FormatError, GWQWeight
from lorakern.models import load_quantized_model, save_quantized_model
from lorakern.ops import reference as ref
from lorakern import testing as oracle
from lorakern.quant import (collect_statistics, gptq_quantize, inverse_hessian_diag, outlier_budget, outlier_scores,
                            quantize_dense, quantize_with_outliers, rtn_params, select_outliers)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def correlated_problem(N=96, K=256, T=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, K, generator=g) / K ** 0.5
    X = torch.randn(T, K, generator=g) @ A + 0.1 * torch.randn(T, K, generator=g)
    X[:, :3] *= 10  # a few dominant input channels, as in LLM activations
    W = torch.randn(N, K, generator=g)
    return W, 2 * X.t() @ X / T


def output_error(W, Wq, H):
    D = W - Wq
    return float(torch.einsum("nk,kl,nl->", D, H, D))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("frac", [0.0, 0.003, 0.01, 0.05])
def test_selection_keeps_exactly_the_budget_and_the_top_scores(per_row, frac, rng):
    N, K = 37, 320
    s = torch.rand(N, K, generator=rng)
    m = select_outliers(s, frac, per_row)
    k = outlier_budget(N, K, frac, per_row)
    assert int(m.sum()) == k
    if per_row:
        assert (m.sum(1) == k // N).all()
        if k:
            assert (s.masked_fill(~m, 2).amin(1) >= s.masked_fill(m, -1).amax(1)).all()
    elif k:
        assert float(s[m].min()) >= float(s[~m].max())
    with pytest.raises(ValueError):
        select_outliers(s, 1.5)
    bad = s.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_outliers(bad, 0.01)


def test_scores(rng):
    w = torch.randn(8, 64, generator=rng)
    g = torch.randn(8, 64, generator=rng)
    assert torch.equal(outlier_scores("grad", w, grad=g), g.abs())
    assert torch.equal(outlier_scores("grad_w", w, grad=g), (g * w).abs())
    assert torch.equal(outlier_scores("grad_w2", w, grad_sq=g * g), (g * g) * w.square())
    hd = torch.rand(64, generator=rng) + 0.1
    torch.testing.assert_close(outlier_scores("hessian", w, hinv_diag=hd), w * w / hd)
    with pytest.raises(ValueError, match="gradient"):
        outlier_scores("grad", w)
    with pytest.raises(ValueError, match="unknown"):
        outlier_scores("nope", w)


def test_inverse_hessian_diag_matches_inverse():
    _, H = correlated_problem(K=64)
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * Hd.diagonal().mean())
    torch.testing.assert_close(inverse_hessian_diag(H), torch.linalg.inv(Hd.double()).diagonal().float(),
                               rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_output_error(act_order, bits):
    W, H = correlated_problem()
    q, s, z, _ = gptq_quantize(W, H, bits, 64, act_order=act_order)
    G = 64
    deq = (s.float().repeat_interleave(G, 1) * (q.float() - z.float().repeat_interleave(G, 1)))
    rtn = lorakern.quantize_rtn(W, bits, G).dequantize()
    e_g, e_r = output_error(W, deq, H), output_error(W, rtn, H)
    assert e_g < 0.6 * e_r, (e_g, e_r)
    assert q.max() < (1 << bits)


def test_gptq_rejects_bad_input():
    W, H = correlated_problem(K=128)
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(W, H[:64, :64], 4, 64)
    Hn = H.clone()
    Hn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(W, Hn, 4, 64)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(W, H, 4, 128, block_size=96)


@pytest.mark.parametrize("dense", ["rtn", "gptq"])
def test_outliers_reproduced_to_fp16_and_excluded_from_statistics(dense, rng):
    W, H = correlated_problem(N=48, K=256)
    W[5, 7] = 80.0  # a huge weight: kept as an outlier, must not stretch its group's range
    mask = select_outliers(W.abs(), 0.01)
    assert mask[5, 7]
    gw = quantize_with_outliers(W, mask, 4, 128, dense, H)
    assert isinstance(gw, GWQWeight) and gw.outliers.nnz == int(mask.sum())
    eff = gw.dequantize()
    if dense == "rtn":  # the sum reproduces every outlier to fp16 precision of the residual
        res = (W - gw.dense.dequantize())[mask]
        assert ((eff[mask] - W[mask]).abs() <= res.abs() * 2.0**-11 + 1e-7).all()
    s_with, _ = rtn_params(W, 4, 128)
    s_without, _ = rtn_params(W, 4, 128, exclude=mask)
    assert float(s_without[5, 0]) < float(s_with[5, 0]) / 10
    if dense == "rtn":
        assert torch.equal(gw.dense.scales, s_without)
    # the dense + outlier weight is closer to W than the dense-only quantization
    plain, _ = quantize_dense(W, 4, 128, dense, H)
    assert output_error(W, eff, H) < output_error(W, plain.dequantize(), H)


def test_gptq_outliers_are_exact_at_the_updated_weights():
    W, H = correlated_problem(N=32, K=128)
    mask = select_outliers(W.abs(), 0.05)
    q, s, z, wf = gptq_quantize(W, H, 3, 64, exclude=mask)
    gw = quantize_with_outliers(W, mask, 3, 64, "gptq", H)
    eff = gw.dequantize()
    res = (wf - gw.dense.dequantize())[mask]
    assert ((eff[mask] - wf[mask]).abs() <= res.abs() * 2.0**-11 + 1e-7).all()


def test_collect_statistics_matches_autograd_and_xtx():
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    name = "model.layers.0.mlp.down_proj"
    st = collect_statistics(model, ids, [name], gradients=True, grad_squares=True, hessians=True, progress=False)[name]
    lin = model.get_submodule(name)
    grads, xs = [], []
    h = lin.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    for i in range(2):
        model.zero_grad()
        model(ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        grads.append(lin.weight.grad.clone())
    h.remove()
    model.zero_grad()
    torch.testing.assert_close(st.grad, (grads[0] + grads[1]) / 2)
    torch.testing.assert_close(st.grad_sq, (grads[0] ** 2 + grads[1] ** 2) / 2)
    X = torch.cat(xs[:2])
    torch.testing.assert_close(st.hessian, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-5)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_gwq_linear_forward_and_save_load(tmp_path, rng):
    W = torch.randn(45, 256, generator=rng)
    gw = quantize_with_outliers(W, select_outliers(W.abs(), 0.02), 4, 128)
    bias = torch.randn(45, generator=rng)
    lin = lorakern.GWQLinear(gw, bias)
    x = torch.randn(3, 256, generator=rng)
    y = lin(x)
    o = gw.outliers
    model = oracle.gwq_matmul_int8_act(x, gw.dense.qweight, gw.dense.scales, gw.dense.zeros, 4, 128, o.row_ptr,
                                    o.col_idx, o.values, bias)
    torch.testing.assert_close(y.double(), model, rtol=1e-5, atol=1e-4)
    lin.save(tmp_path / "l.safetensors")
    back = lorakern.GWQLinear.load(tmp_path / "l.safetensors")
    assert torch.equal(back(x), y)
    lorakern.QuantLinear.from_linear(nn.Linear(256, 8), 4, 128).save(tmp_path / "q.safetensors")
    with pytest.raises(FormatError, match="not a GWQLinear"):
        lorakern.GWQLinear.load(tmp_path / "q.safetensors")


@pytest.mark.parametrize("method", ["rtn", "gptq", "gwq", "spqr", "magnitude", "random"])
def test_quantize_model_methods_and_directory_roundtrip(method, tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_logits = model(ids).logits
    qm = lorakern.quantize_model(model, bits=4, group_size=128, method=method, calibration=ids, outliers=0.02,
                                 progress=False)
    rec = qm.lorakern_quantization
    kinds = {type(m).__name__ for n, m in qm.named_modules()
             if isinstance(m, (lorakern.QuantLinear, lorakern.GWQLinear)) and n != "lm_head"}
    assert kinds == ({"QuantLinear"} if method in ("rtn", "gptq") else {"GWQLinear"})
    assert type(qm.lm_head).__name__ == "QuantLinear" and rec["head"]["bits"] == 8  # the head: 8-bit RTN
    assert len(rec["layers"]) == 14 and rec["avg_bits"] > 4
    with torch.no_grad():
        logits = qm(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits - ref_logits).abs().mean() < 0.2 * ref_logits.abs().mean()
    save_quantized_model(qm, tmp_path / "m")
    back = load_quantized_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, logits)


def test_quantize_model_needs_calibration_and_known_methods():
    with pytest.raises(ValueError, match="calibration"):
        lorakern.quantize_model(tiny_llama(), method="gwq", progress=False)
    with pytest.raises(ValueError, match="unknown quantization method"):
        lorakern.quantize_model(tiny_llama(), method="smoothquant", progress=False)


def test_model_directory_rejects_damage(tmp_path):
    model = tiny_llama()
    qm = lorakern.quantize_model(model, bits=4, group_size=128, method="magnitude", dense="rtn", progress=False)
    d = save_quantized_model(qm, tmp_path / "m")
    with pytest.raises(FormatError, match="not a lorakern model directory"):
        load_quantized_model(tmp_path)
    meta = json.loads((d / "lorakern_quantization.json").read_text())
    name = next(n for n, k in meta["modules"].items() if k == "GWQLinear")
    meta["modules"][name] = "QuantLinear"
    (d / "lorakern_quantization.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="stored as GWQWeight"):
        load_quantized_model(d)
    meta["modules"][name] = "GWQLinear"
    if meta["tied"]:  # the tied embedding must name a quantized head
        emb = next(iter(meta["tied"]))
        (d / "lorakern_quantization.json").write_text(json.dumps({**meta, "tied": {emb: name}}))
        with pytest.raises(FormatError, match="'tied' must map"):
            load_quantized_model(d)
    meta["modules"]["model.layers.9.mlp.up_proj"] = "GWQLinear"
    (d / "lorakern_quantization.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError):
        load_quantized_model(d)
    del meta["modules"]["model.layers.9.mlp.up_proj"]
    (d / "lorakern_quantization.json").write_text(json.dumps(meta))
    data = (d / "rest.safetensors").read_bytes()
    (d / "rest.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        load_quantized_model(d)
