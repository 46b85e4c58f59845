"""The native decode step (lorakern.models.native): each decoder layer's decode step as one C++ call, against
transformers' own LlamaDecoderLayer on the same inputs and cache, and inside generate."""
import copy

import pytest
import torch

import lorakern
from lorakern.models.native import disable_native_decode, enable_native_decode, native_decode_layers
from lorakern.nn import QuantLinear
from lorakern.testing import count_native_calls as _count_native_calls
from lorakern.testing import tiny_llama

pytest.importorskip("transformers")
from transformers import StaticCache  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402


def _quantized(method="rtn", bias=False, bits=4, attn="sdpa", layers=3):
    model = tiny_llama(seed=7, vocab_size=160, hidden_size=128, intermediate_size=192, attention_bias=bias,
                       mlp_bias=bias, num_hidden_layers=layers, attn_implementation=attn)
    kw = dict(method="magnitude", dense="rtn", outliers=0.02) if method == "gwq" else {}
    return lorakern.quantize_model(model, bits=bits, group_size=32, progress=False, **kw)


def _layer_cases(model, ids, attention_mask=None, steps=3):
    """Run prefill and ``steps`` decode steps of ``model`` (native) and capture, at every decode step and layer,
    the layer's inputs and a copy of its cache before the call, and its output and cache after."""
    cases = []

    def pre(mod, args, kwargs):
        cl = kwargs["cache"].layers[mod.self_attn.layer_idx]
        mod._lk_before = (args[0].clone(), dict(kwargs), copy.deepcopy(cl) if args[0].shape[1] == 1 else None)

    def post(mod, args, kwargs, out):
        x, kw, cl = mod._lk_before
        if cl is not None:
            after = kwargs["cache"].layers[mod.self_attn.layer_idx]
            cases.append((mod, x, kw, cl, out.clone(), after.keys.clone(), after.values.clone(),
                          int(after.cumulative_length)))

    hooks = [h for l in model.model.layers for h in (l.register_forward_pre_hook(pre, with_kwargs=True),
                                                      l.register_forward_hook(post, with_kwargs=True))]
    try:
        with torch.no_grad(), _count_native_calls() as calls:
            model.generate(ids, attention_mask=attention_mask, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                           do_sample=False, pad_token_id=0)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == steps * len(model.model.layers)  # every decode step of every layer went native
    return cases


def _check_layers_against_transformers(model, ids, attention_mask=None):
    cases = _layer_cases(model, ids, attention_mask)
    assert len(cases) == 3 * len(model.model.layers)
    for mod, x, kw, cl, out, keys, values, length in cases:
        assert torch.isfinite(out).all()
        cache = copy.deepcopy(kw["cache"])  # transformers' forward on the saved state of this layer's cache
        cache.layers[mod.self_attn.layer_idx] = cl
        with torch.no_grad():
            want = LlamaDecoderLayer.forward(mod, x, **{**kw, "cache": cache})
        ref_cl = cache.layers[mod.self_attn.layer_idx]
        # fp32 rounding in a different order (norms, attention, residuals), then the int8 activation codes of the
        # projections: an input moved by an ulp can move a code one step (~1% of its block's max): bound by that
        scale = want.abs().max().item()
        assert (out - want).abs().max().item() <= 2e-3 * scale, (out - want).abs().max().item() / scale
        assert length == int(ref_cl.cumulative_length)
        assert (keys - ref_cl.keys).abs().max() <= 1e-4 * ref_cl.keys.abs().max() + 1e-6
        assert (values - ref_cl.values).abs().max() <= 1e-4 * ref_cl.values.abs().max() + 1e-6


@pytest.mark.parametrize("method,bias,bits,batch", [("rtn", False, 4, 1), ("rtn", True, 3, 1), ("gwq", False, 4, 1),
                                                    ("rtn", False, 2, 1), ("rtn", False, 8, 1), ("rtn", False, 4, 5),
                                                    ("gwq", True, 8, 17)])
def test_native_layers_match_transformers(isa, method, bias, bits, batch):
    """batch >= 4: the projections inside the layer run the blocked GEMM (8-bit from 16 rows). Every ISA path
    (``isa``): the step's SiLU and attention are built per ISA (csrc/src/decode_math.h), and the C++ test binary
    is a sanitized build in which the compiler vectorizes none of those loops: this is where the vectorized ones
    are checked."""
    model = lorakern.prepare_decode(_quantized(method, bias, bits))
    assert native_decode_layers(model)[:2] == (3, 3)
    assert model.generation_config.disable_compile  # the native step replaces the compiled one
    ids = torch.randint(3, 160, (batch, 7), generator=torch.Generator().manual_seed(1))
    _check_layers_against_transformers(model, ids)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # a boolean mask and an additive float mask
def test_native_layers_with_left_padding(attn):
    model = lorakern.prepare_decode(_quantized(attn=attn))
    ids = torch.randint(3, 160, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding of different lengths
    mask[2, :1] = 0
    ids[mask == 0] = 0
    _check_layers_against_transformers(model, ids, mask)


def test_native_generate_matches_transformers_path():
    q = _quantized()
    ids = torch.randint(3, 160, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        want = lorakern.prepare_decode(copy.deepcopy(q), compile=False, native=False).generate(ids, **kw)
        nat = lorakern.prepare_decode(copy.deepcopy(q))
        with _count_native_calls() as calls:
            got = nat.generate(ids, **kw)
    assert len(calls) == 5 * 3  # 5 decode steps (the first token comes from the prefill) x 3 layers
    assert torch.equal(got.sequences, want.sequences)
    assert (torch.stack(got.logits) - torch.stack(want.logits)).abs().max() < 1e-2


def test_not_eligible_layers_take_transformers_path(tmp_path):
    from lorakern.testing import save_random_peft_adapters
    fp = tiny_llama(seed=7, vocab_size=160, hidden_size=128, intermediate_size=192, num_hidden_layers=3)
    q = lorakern.quantize_model(copy.deepcopy(fp), bits=4, group_size=32, progress=False)
    # unquantized model: nothing qualifies; native=None leaves the layers and the compile setting alone
    m = lorakern.prepare_decode(copy.deepcopy(fp))
    assert native_decode_layers(m)[:2] == (0, 3) and not m.generation_config.disable_compile
    assert type(m.model.layers[0]) is LlamaDecoderLayer
    m = copy.deepcopy(fp)
    assert enable_native_decode(m) == 0
    assert any("fused" in w for w in native_decode_layers(m)[2])
    # an adapter on every layer's q_proj: no layer is fused, so none is native
    paths = save_random_peft_adapters(fp, tmp_path, {"a": ["q_proj"]}, 0.3)
    ad = copy.deepcopy(q)
    from lorakern.adapters import attach_adapter, load_peft_adapter
    attach_adapter(ad, load_peft_adapter(paths["a"]))
    lorakern.prepare_decode(ad, native=True)
    n, total, why = native_decode_layers(ad)
    assert (n, total) == (0, 3) and any("attention" in w or "projection" in w for w in why)
    ids = torch.randint(3, 160, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = ad.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        disable_native_decode(ad)
        b = ad.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    # gradients, a dynamic cache: transformers' path
    nat = lorakern.prepare_decode(copy.deepcopy(q))
    layer = nat.model.layers[0]
    from lorakern.models.native import _native_step
    x = torch.randn(1, 1, 128)
    assert _native_step(layer, x, None, None, None) is None
    from transformers import DynamicCache
    assert _native_step(layer, x, None, DynamicCache(config=nat.config), (x, x)) is None


def test_record_follows_replaced_tensors():
    """The C record holds addresses: a projection whose tensors are replaced (e.g. re-quantized in place of the
    module) must be rebuilt, never read through stale pointers."""
    q = lorakern.prepare_decode(_quantized())
    ids = torch.randint(3, 160, (1, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = q.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        layer = q.model.layers[1].mlp
        old = layer.down_proj
        layer.down_proj = QuantLinear(old.quantized_weight.__class__(old.qweight.clone(), old.scales.clone() * 0,
                                                                     old.zeros.clone(), old.bits, old.group_size))
        after = q.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        ref = lorakern.prepare_decode(copy.deepcopy(q), native=False, compile=False)
        want = ref.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(after, want) and not torch.equal(before, after)
        # a parameter given new data in place of its object (what Module._apply does): the new address is used
        norm = q.model.layers[0].post_attention_layernorm
        norm.weight.data = norm.weight.data.clone().neg_()
        got = q.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
        ref = lorakern.prepare_decode(copy.deepcopy(q), native=False, compile=False)
        want = ref.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                            pad_token_id=0)
    assert torch.equal(got.sequences, want.sequences)
    assert (torch.stack(got.logits) - torch.stack(want.logits)).abs().max() < 1e-2


def test_copies_and_pickles_carry_no_addresses(tmp_path):
    q = lorakern.prepare_decode(_quantized())
    ids = torch.randint(3, 160, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a = q.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        c = copy.deepcopy(q)
        del q
        b = c.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    assert type(c.model.layers[0]).__name__ == "NativeLlamaDecoderLayer"
    torch.save(c.model.layers[0], tmp_path / "layer.pt")  # pickles by class name (our own file)
    layer = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert type(layer) is type(c.model.layers[0])


def test_c_abi_refuses_bad_arguments():
    from lorakern._native import native
    q = lorakern.prepare_decode(_quantized())
    from lorakern.models.native import _Record
    rec = _Record(q.model.layers[0]).record
    x = torch.randn(1, 128)
    cs = torch.ones(1, 32)
    k = torch.zeros(1, 2, 8, 32)
    v = torch.zeros(1, 2, 8, 32)
    y = torch.empty(1, 128)
    for pos, L in ((8, 8), (-1, 8), (0, 0)):
        with pytest.raises(RuntimeError, match="invalid argument"):
            native().decoder_layer_step(rec, x.data_ptr(), 1, cs.data_ptr(), cs.data_ptr(), pos, k.data_ptr(),
                                        v.data_ptr(), L, 0, y.data_ptr(), 1)
    bad = native().DecoderLayerRecord([128, 4, 3, 32, 192], 1e-5, 0.1, 1, 1, [[0] * 7] * 4, [[]] * 4, [0] * 4)
    with pytest.raises(RuntimeError, match="invalid argument"):
        native().decoder_layer_step(bad, x.data_ptr(), 1, cs.data_ptr(), cs.data_ptr(), 0, k.data_ptr(),
                                    v.data_ptr(), 8, 0, y.data_ptr(), 1)
    with pytest.raises(ValueError):
        native().DecoderLayerRecord([128, 4], 1e-5, 0.1, 1, 1, [], [], [])
