"""Whatever a user does with a transformers model after quantize_model / load_quantized_model /
attach_adapters: decoding strategies (against PEFT), dtype casts, device moves, save_pretrained, compile."""
import copy

import pytest
import torch

import lorakern
from lorakern.models import load_quantized_model
from lorakern.testing import save_random_peft_adapters, tiny_llama

peft = pytest.importorskip("peft")


IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ad")
    model = tiny_llama()
    paths = save_random_peft_adapters(model, tmp, {"a": ["q_proj", "v_proj"], "b": ["k_proj", "down_proj"]}, 0.3)
    return model, paths


def peft_with(model, paths):
    names = list(paths)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), paths[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(paths[n], adapter_name=n)
    return pm.eval()


STRATEGIES = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=3, do_sample=False),
    "beam_return_2": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    "sample": dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8),
    "repetition_penalty": dict(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_generate_strategies_match_peft(adapters, strategy):
    model, paths = adapters
    pm = peft_with(model, paths)
    lm = copy.deepcopy(model)
    lorakern.attach_adapters(lm, paths, dtype=torch.float32)
    kw = dict(max_new_tokens=6, pad_token_id=0, **STRATEGIES[strategy])
    names = ["a", "b"]
    torch.manual_seed(0)
    ref = pm.generate(input_ids=IDS, adapter_names=names, **kw)
    torch.manual_seed(0)
    ours = lm.generate(IDS, adapter_names=names, **kw)
    assert torch.equal(ours, ref)


def test_sampling_with_several_return_sequences(adapters):
    """num_return_sequences with sampling: PEFT refuses mixed names there; lorakern repeats each sample's
    name, and equals PEFT running the one adapter for the whole batch."""
    model, paths = adapters
    pm = peft_with(model, paths)
    pm.set_adapter("b")
    lm = copy.deepcopy(model)
    lorakern.attach_adapters(lm, paths, dtype=torch.float32)
    kw = dict(max_new_tokens=5, pad_token_id=0, do_sample=True, num_return_sequences=3)
    torch.manual_seed(0)
    ref = pm.generate(input_ids=IDS, **kw)
    torch.manual_seed(0)
    ours = lm.generate(IDS, adapter_names=["b", "b"], **kw)
    assert ours.shape == (6, 12) and torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_casts(adapters, dtype):
    model, paths = adapters
    q = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=32, progress=False)
    with torch.no_grad():
        ref = q(IDS).logits
        qc = copy.deepcopy(q).to(dtype)
        layer = qc.model.layers[0].self_attn.q_proj
        assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.uint8  # the format stays
        out = qc(IDS).logits
        assert out.dtype == dtype
        tol = 0.05 if dtype == torch.bfloat16 else 0.015  # fp16: measured 0.0102 of max with the 8-bit head
        assert (out.float() - ref).abs().max() < tol * ref.abs().max()
        lorakern.attach_adapters(qc, paths, dtype=torch.float16)
        with_ad = qc(IDS, adapter_names=["a", "b"]).logits
        assert with_ad.dtype == dtype and torch.isfinite(with_ad).all()
        back = qc.float()  # and back again: nothing was lost in the format buffers
        assert torch.equal(back.model.layers[0].self_attn.q_proj.base.scales, q.model.layers[0].self_attn.q_proj.scales)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        copy.deepcopy(q).double()(IDS)


def test_device_moves(adapters):
    model, paths = adapters
    q = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=32, progress=False)
    with torch.no_grad():
        ref = q(IDS).logits
        assert torch.equal(q.to("cpu")(IDS).logits, ref) and torch.equal(q.cpu()(IDS).logits, ref)
        lm = copy.deepcopy(model)
        lorakern.attach_adapters(lm, paths, device="meta")  # a bank left on another device: a clear error
        with pytest.raises(RuntimeError, match="adapter bank is on meta"):
            lm(IDS, adapter_names=["a", "b"])


def test_save_pretrained_and_reload(adapters, tmp_path):
    model, paths = adapters
    for method in ("rtn", "gwq"):
        q = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=32, method=method, progress=False,
                                    calibration=IDS if method == "gwq" else None)
        q.save_pretrained(tmp_path / method)          # a lorakern model directory, not unusable buffers
        back = load_quantized_model(tmp_path / method)
        with torch.no_grad():
            assert torch.equal(back(IDS).logits, q(IDS).logits)
        back.save_pretrained(tmp_path / f"{method}2")  # and again from the loaded one
        assert torch.equal(load_quantized_model(tmp_path / f"{method}2")(IDS).logits, back(IDS).logits)
    lm = copy.deepcopy(model)
    lorakern.attach_adapters(lm, paths)
    with pytest.raises(ValueError, match="adapters attached"):
        lm.save_pretrained(tmp_path / "attached")
    with pytest.raises(ValueError, match="adapters attached"):
        with lorakern.adapters.apply_adapter(q, lorakern.adapters.load_peft_adapter(paths["a"])):
            q.save_pretrained(tmp_path / "applied")
    lorakern.detach_adapters(lm)
    lm.save_pretrained(tmp_path / "plain")  # transformers' own, once nothing is attached
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")(IDS).logits, model(IDS).logits)


def test_torch_compile(adapters):
    model, paths = adapters
    q = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=32, progress=False)
    lorakern.attach_adapters(q, paths, dtype=torch.float32)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = q(IDS, adapter_names=["a", "b"]).logits
        eager_base = q(IDS).logits
        compiled = torch.compile(q)
        out = compiled(IDS, adapter_names=["a", "b"]).logits
        out_base = compiled(IDS).logits
    # the compiled graph runs the same ops; int8 activation rounding may differ by fusion order only
    assert (out - eager).abs().max() < 1e-3 * eager.abs().max()
    assert (out_base - eager_base).abs().max() < 1e-3 * eager_base.abs().max()
