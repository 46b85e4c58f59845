"""quantize_model on the models users bring: GPT-2's Conv1D, inputs and layers calibration never reaches."""
import copy
import logging

import pytest
import torch
from torch import nn

import lorakern
from lorakern.nn import GWQLinear, QuantLinear
from lorakern.quant.gptq import gptq_quantize
from lorakern.quant.rtn import rtn_params


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def tiny_llama_with_extra_head():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    m.model.extra_head = nn.Linear(64, 32)  # never called by forward: calibration cannot reach it
    return m


IDS = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("method", ["rtn", "gptq", "gwq"])
def test_gpt2_conv1d_is_quantized(method, tmp_path):
    model = tiny_gpt2()
    with torch.no_grad():
        ref = model(IDS).logits
    cal = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(3))
    q = lorakern.quantize_model(copy.deepcopy(model), bits=8, group_size=32, method=method,
                                calibration=None if method == "rtn" else cal, progress=False)
    rec = q.lorakern_quantization
    assert len(rec["layers"]) == 8 and rec["avg_bits"] > 8 and rec["kept"] == {}
    assert rec["head"]["tied_embedding"] and type(q.transformer.wte).__name__ == "QuantEmbedding"  # GPT-2 ties wte
    kinds = {type(q.transformer.h[0].attn.c_attn), type(q.transformer.h[1].mlp.c_proj)}
    assert kinds <= {QuantLinear, GWQLinear}
    with torch.no_grad():
        out = q(IDS).logits
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()   # 8-bit: close; a transposed weight would be far
    from lorakern.models import load_quantized_model, save_quantized_model
    save_quantized_model(q, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(load_quantized_model(tmp_path / "q")(IDS).logits, out)


def test_quantizing_nothing_is_an_error():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="no layer to quantize"):
        lorakern.quantize_model(model, progress=False)
    lin = nn.Sequential(nn.Linear(30, 8))
    with pytest.raises(ValueError, match=r"0: in_features=30 is not a multiple"):
        lorakern.quantize_model(lin, progress=False)


def test_gptq_keeps_dead_inputs():
    """Inputs always zero in calibration keep their round-to-nearest values (they were zeroed)."""
    g = torch.Generator().manual_seed(0)
    N, K, G = 48, 256, 64
    w = torch.randn(N, K, generator=g) * 0.05
    X = torch.randn(512, K, generator=g)
    dead = torch.tensor([3, 70, 71, 200])
    X[:, dead] = 0
    H = 2 * X.t() @ X / X.shape[0]
    q, s, z, _ = gptq_quantize(w, H, 4, G)
    deq = (q.float() - z.float().repeat_interleave(G, 1)) * s.float().repeat_interleave(G, 1)
    err_dead = (deq[:, dead] - w[:, dead]).abs()
    half_step = s.float().repeat_interleave(G, 1)[:, dead] / 2
    assert (err_dead <= half_step * 1.001 + 1e-6).all()
    rs, _ = rtn_params(w, 4, G)
    assert err_dead.max() < 1.5 * float(rs.float().max())  # plain rounding's scale, not the weight itself
    assert deq[:, dead].abs().sum() > 0


@pytest.mark.parametrize("method", ["gptq", "gwq"])
def test_unreached_layer_falls_back_to_rtn(method, caplog):
    model = tiny_llama_with_extra_head()
    w = model.model.extra_head.weight.detach().clone()
    cal = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(4))
    with caplog.at_level(logging.WARNING, logger="lorakern"):
        q = lorakern.quantize_model(model, bits=4, group_size=32, method=method, calibration=cal, progress=False)
    assert "model.extra_head" in q.lorakern_quantization["fallback"]
    assert any("extra_head" in r.message and "never reached" in r.message for r in caplog.records)
    head = q.model.extra_head
    assert type(head) is QuantLinear
    rtn = lorakern.quantize_rtn(w, 4, 32)
    assert torch.equal(head.dequantize(), rtn.dequantize())
    assert head.dequantize().abs().sum() > 0


def test_quantize_errors_name_the_layer():
    model = tiny_llama_with_extra_head()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj"):
        lorakern.quantize_model(model, bits=4, group_size=32, progress=False)


def test_quantized_model_is_freed_without_the_cycle_collector_and_copies_save_themselves(tmp_path):
    import gc
    import weakref
    from transformers import LlamaConfig, LlamaForCausalLM
    from lorakern.models import load_quantized_model
    model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    qm = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=32, progress=False)
    twin = copy.deepcopy(qm)
    assert twin.save_pretrained.model is twin and qm.save_pretrained.model is qm
    with torch.no_grad():
        twin.lm_head.scales.mul_(2)  # the copy differs: its own save_pretrained must write it, not the original
    twin.save_pretrained(tmp_path / "twin")
    ids = torch.randint(0, 101, (1, 9))
    torch.testing.assert_close(load_quantized_model(tmp_path / "twin")(ids).logits, twin(ids).logits, rtol=0, atol=0)
    ref = weakref.ref(qm)
    was = gc.isenabled()
    gc.disable()
    try:
        del qm
        assert ref() is None  # no reference cycle keeps a quantized model alive
    finally:
        if was:
            gc.enable()
