import pytest
import torch

import lorakern
from lorakern.nn import QuantLinear
from lorakern.ops import reference as ref


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_from_linear_forward_matches_reference(bits):
    lin = torch.nn.Linear(192, 45)
    ql = QuantLinear.from_linear(lin, bits, 64)
    x = torch.randn(3, 192)
    y = ql(x)
    w = ql.quantized_weight
    expect = ref.quant_matmul(x, w.qweight, w.scales, w.zeros, bits, 64, lin.bias)
    # int8 activations: relative error well under the weight quantization error
    assert (y - expect).abs().max() <= 0.02 * expect.abs().max()
    # and RTN error shrinks with bits
    dense = lin(x)
    rel = (y - dense).norm() / dense.norm()
    assert rel < {2: 0.6, 3: 0.25, 4: 0.12, 8: 0.02}[bits]


def test_rtn_codes_are_nearest():
    w = torch.randn(7, 128)
    q = lorakern.quantize_rtn(w, 4, 32)
    d = q.dequantize()
    step = q.scales.float().repeat_interleave(32, dim=1)
    assert ((d - w).abs() <= step / 2 + 1e-6).all()


def test_save_load_bit_identical(tmp_path):
    lin = torch.nn.Linear(256, 33)
    ql = QuantLinear.from_linear(lin, 3, 128)
    p = tmp_path / "ql.safetensors"
    ql.save(p)
    ql2 = QuantLinear.load(p)
    for name in ("qweight", "scales", "zeros", "bias"):
        assert torch.equal(getattr(ql, name), getattr(ql2, name))
    x = torch.randn(5, 256)
    assert torch.equal(ql(x), ql2(x))
    no_bias = QuantLinear.from_linear(torch.nn.Linear(64, 8, bias=False), 4, 32)
    no_bias.save(tmp_path / "nb.safetensors")
    assert QuantLinear.load(tmp_path / "nb.safetensors").bias is None


def test_from_linear_rejects_bad_weights():
    lin = torch.nn.Linear(64, 4)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        QuantLinear.from_linear(lin, 4, 32)
    with pytest.raises(ValueError, match="multiple"):
        QuantLinear.from_linear(torch.nn.Linear(48, 4), 4, 32)
    with pytest.raises(TypeError):
        QuantLinear.from_linear(torch.nn.Conv1d(4, 4, 1), 4, 32)


def test_quantize_model_replaces_linears_and_falls_back_on_group():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref_logits = model(ids).logits
    lorakern.quantize_model(model, bits=8, group_size=64, progress=False)
    rec = model.lorakern_quantization
    assert isinstance(model.lm_head, QuantLinear) and rec["head"]["bits"] == 8  # the head: 8-bit RTN apart
    assert rec["head"]["group_size"] == 32 and not rec["head"]["tied_embedding"]
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant - 1 == 2 * 7 == len(rec["layers"])
    assert rec["layers"]["model.layers.0.self_attn.q_proj"] == 32  # 96 is not a multiple of 64
    assert rec["layers"]["model.layers.0.mlp.down_proj"] == 64
    with torch.no_grad():
        q_logits = model(ids).logits
    assert (q_logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()


def test_sign_weights_are_scale_times_sign():
    w = torch.randn(9, 256)
    q = lorakern.quant.quantize_sign(w, 64)
    assert q.bits == 1
    s = w.abs().view(9, 4, 64).mean(-1).half().float()  # mean|w| per group, as stored (2s in fp16, exact /2)
    expect = (torch.where(w >= 0, 1.0, -1.0).view(9, 4, 64) * s.unsqueeze(-1)).view(9, 256)
    torch.testing.assert_close(q.dequantize(), expect, rtol=2e-3, atol=0)
    x = torch.randn(3, 256)
    y = torch.ops.lorakern.quant_matmul(x, q.qweight, q.scales, q.zeros, 1, 64)
    torch.testing.assert_close(y, x @ q.dequantize().t(), rtol=0.02, atol=0.02 * float(y.abs().max()))
    with pytest.raises(ValueError, match="quantize_sign"):
        lorakern.quantize_rtn(w, 1, 64)
