"""The decode path: the quantized output head and the tied embedding that reads it, saved and reloaded."""
import copy

import pytest
import torch

import lorakern
from lorakern import testing as oracle
from lorakern.models import load_quantized_model
from lorakern.nn import QuantEmbedding, QuantLinear
from lorakern.ops import reference as ref
from lorakern.testing import tiny_llama

pytest.importorskip("transformers")
IDS = torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(5))
# Compiled vs eager logits: inductor reorders the fp32 arithmetic around the kernels (norms, rotary, residuals),
# and a last-bit change of an activation can move its int8 code across a rounding boundary (one step, ~1% of the
# block's max): up to ~1e-3 on these logits of magnitude ~1, and more where such flips compound over a dozen
# decode steps (the tiny Gemma 3's sliding-window test, logits up to 0.84: 3e-3 measured on an Intel Xeon, 1.02e-2 on
# an AMD EPYC with AVX-512, where inductor vectorizes the fp32 code around the kernels differently). A wrong compiled
# path (an adapter missing or misrouted) moves them by > 0.1 (asserted where adapters are used).
COMPILED_ATOL = 3e-2


def tied_llama():
    return tiny_llama(seed=1, vocab_size=160, hidden_size=128, intermediate_size=256, tie_word_embeddings=True)


@pytest.mark.parametrize("head_bits", [8, 4])
def test_head_quantized_and_tied_embedding_reads_its_rows(head_bits):
    model = tied_llama()
    assert model.model.embed_tokens.weight is model.lm_head.weight
    q = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=64, head_bits=head_bits, progress=False)
    head, emb = q.lm_head, q.model.embed_tokens
    assert isinstance(head, QuantLinear) and head.bits == head_bits and isinstance(emb, QuantEmbedding)
    assert emb.qweight is head.qweight and emb.scales is head.scales and emb.tied_to == "lm_head"
    assert not q.config.tie_word_embeddings and not any(p.numel() == 160 * 128 for p in q.parameters())
    w = ref.dequantize(head.qweight, head.scales, head.zeros, head_bits, 64)
    with torch.no_grad():
        emb_out = emb(IDS)
        assert torch.equal(emb_out, w[IDS])  # exactly the table's dequantized rows
        x = torch.randn(3, 128)
        y = head(x)
        model_y = oracle.quant_matmul_int8_act(x, head.qweight, head.scales, head.zeros, head_bits, 64)
        assert (y.double() - model_y).abs().max() < 1e-3
        assert (q(IDS).logits - model(IDS).logits).abs().max() < 0.5 * model(IDS).logits.abs().max()
    rec = q.lorakern_quantization["head"]
    assert rec == {"name": "lm_head", "bits": head_bits, "group_size": 64, "tied_embedding": True,
                   "avg_bits": rec["avg_bits"], "embedding": "model.embed_tokens"}


def test_8bit_head_costs_little():
    model = tied_llama()
    with torch.no_grad():
        fp_head = lorakern.quantize_model(copy.deepcopy(model), bits=8, group_size=64, head_bits=None, progress=False)
        q_head = lorakern.quantize_model(copy.deepcopy(model), bits=8, group_size=64, progress=False)
        a, b = fp_head(IDS).logits, q_head(IDS).logits
    assert isinstance(fp_head.lm_head, torch.nn.Linear) and isinstance(fp_head.model.embed_tokens, torch.nn.Embedding)
    assert fp_head.lorakern_quantization["kept"] == {"lm_head": "output head (head_bits=None)"}
    assert (a - b).abs().max() < 0.02 * a.abs().max()


def test_skip_keeps_the_head():
    q = lorakern.quantize_model(tied_llama(), bits=4, group_size=64, skip=["lm_head"], progress=False)
    assert isinstance(q.lm_head, torch.nn.Linear) and q.model.embed_tokens.weight is q.lm_head.weight
    assert "head" not in q.lorakern_quantization


def test_tied_model_saved_and_reloaded(tmp_path):
    q = lorakern.quantize_model(tied_llama(), bits=4, group_size=64, progress=False)
    q.save_pretrained(tmp_path / "q")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "q" / "quantized.safetensors"), "pt") as f:
        assert not any(k.startswith("model.embed_tokens") for k in f.keys())  # the rows are stored once
    with safe_open(str(tmp_path / "q" / "rest.safetensors"), "pt") as f:
        assert not any("embed_tokens" in k or "lm_head" in k for k in f.keys())
    r = load_quantized_model(tmp_path / "q")
    assert r.model.embed_tokens.qweight is r.lm_head.qweight
    with torch.no_grad():
        assert torch.equal(r(IDS).logits, q(IDS).logits)
        assert torch.equal(r.generate(IDS, max_new_tokens=4, do_sample=False),
                           q.generate(IDS, max_new_tokens=4, do_sample=False))


def test_quant_embedding_refuses_bad_ids():
    q = lorakern.quantize_model(tied_llama(), bits=4, group_size=64, progress=False)
    with pytest.raises(IndexError, match="outside"):
        q.model.embed_tokens(torch.tensor([[1, 160]]))
    with pytest.raises(IndexError, match="outside"):
        q.model.embed_tokens(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        q.model.embed_tokens(torch.tensor([1.0]))


def _generate(model, **kw):
    out = model.generate(IDS, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         **kw)
    return out.sequences, torch.stack(out.logits)


def test_compiled_decode_matches_eager_with_and_without_adapters(tmp_path):
    """prepare_decode: static cache + torch.compile of the decode step (fullgraph: a graph break fails the test);
    the same tokens and logits as eager, a bank of adapters inside the compiled graph, and no recompile storm:
    the batch's entry and segment counts are dynamic sizes, so once the 0/1-size variants torch specializes
    on are compiled (one adapter or several, one entry or several), new adapter combinations reuse them."""
    import torch._dynamo as dynamo

    from lorakern.testing import save_random_peft_adapters
    model = tied_llama()
    paths = save_random_peft_adapters(model, tmp_path, {"a": ["q_proj", "v_proj"], "b": ["k_proj", "up_proj", "down_proj"]},
                                      0.3)
    q = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=64, progress=False)
    lorakern.attach_adapters(q, paths, dtype=torch.float16)
    first = (("a", "b"), ("b", "__base__"), ("a", "a"))
    later = (("b", "a"), ("__base__", "a"), ("b", "b"))
    with torch.no_grad():
        lorakern.prepare_decode(q, compile=False, native=False)
        eager = {names: _generate(q, adapter_names=list(names)) for names in first + later}
        eager_base = _generate(q)
        lorakern.prepare_decode(q, native=False)
        dynamo.reset()
        dynamo.utils.counters.clear()
        for names in first + later:
            if names == later[0]:
                graphs = dynamo.utils.counters["stats"]["unique_graphs"]
            c_toks, c_logits = _generate(q, adapter_names=list(names))
            assert torch.equal(c_toks, eager[names][0]) and (c_logits - eager[names][1]).abs().max() < COMPILED_ATOL
        assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs <= 3  # the later combinations: no recompile
        c_toks, c_logits = _generate(q)  # no adapters: the bank is skipped
        assert torch.equal(c_toks, eager_base[0]) and (c_logits - eager_base[1]).abs().max() < COMPILED_ATOL
        assert (eager[("a", "b")][1] - eager_base[1]).abs().max() > 0.1  # the adapters do change the output


def test_compiled_decode_of_a_quantized_tied_model_matches_eager():
    q = lorakern.quantize_model(tied_llama(), bits=3, group_size=64, progress=False)
    with torch.no_grad():
        toks, logits = _generate(lorakern.prepare_decode(q, compile=False, native=False))
        c_toks, c_logits = _generate(lorakern.prepare_decode(q, native=False))
    assert torch.equal(c_toks, toks) and (c_logits - logits).abs().max() < COMPILED_ATOL
    with pytest.raises(TypeError, match="generation_config"):
        lorakern.prepare_decode(torch.nn.Linear(2, 2))


def test_a_copy_of_a_compiled_model_does_not_run_the_original(tmp_path):
    """transformers caches the compiled decode step on the model and deepcopy carries it along: quantizing or
    attaching adapters to the copy must drop it, or the copy silently runs the original's forward."""
    from lorakern.testing import save_random_peft_adapters
    model = tied_llama()
    with torch.no_grad():
        lorakern.prepare_decode(model)
        fp_toks, _ = _generate(model)
        q = lorakern.quantize_model(copy.deepcopy(model), bits=2, group_size=64, progress=False)
        assert "_compiled_call" not in q.__dict__
        want = _generate(lorakern.prepare_decode(copy.deepcopy(q), compile=False, native=False))[1]
        got = _generate(lorakern.prepare_decode(q, native=False))[1]
        assert (got - want).abs().max() < COMPILED_ATOL
        paths = save_random_peft_adapters(model, tmp_path, {"a": ["q_proj", "v_proj"]}, 0.5)
        ad = copy.deepcopy(q)
        lorakern.attach_adapters(ad, paths, dtype=torch.float32)
        assert "_compiled_call" not in ad.__dict__


def _quantized(method="rtn", bias=False):
    model = tiny_llama(seed=3, vocab_size=160, hidden_size=128, intermediate_size=256, attention_bias=bias,
                       mlp_bias=bias)
    kw = dict(method="magnitude", dense="rtn", outliers=0.02) if method in ("gwq", "mixed") else {}
    q = lorakern.quantize_model(model, bits=4, group_size=64, progress=False, **kw)
    if method == "mixed":  # one projection of each fused group without outliers: rows with none in the stack
        for layer in q.model.layers:
            for parent, name in ((layer.self_attn, "k_proj"), (layer.mlp, "up_proj")):
                g = getattr(parent, name)
                setattr(parent, name, QuantLinear(g.weight_gwq.dense, None))  # and without a bias
    return q


def _count_calls(model, ids):
    counts = {"n": 0}
    hooks = [m.register_forward_hook(lambda *_: counts.__setitem__("n", counts["n"] + 1))
             for m in model.modules() if isinstance(m, (QuantLinear, lorakern.nn.GWQLinear))]
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    return counts["n"], logits


@pytest.mark.parametrize("method,bias", [("rtn", False), ("rtn", True), ("gwq", False), ("mixed", True)])
def test_fused_projections_are_bit_identical(method, bias):
    """q/k/v and gate/up stacked into one layer each: the same rows through the same kernel, so the logits and
    generated tokens are bitwise those of the separate layers, with 3 fewer calls per decoder layer; unfusing
    gives back the very codes, outliers and biases."""
    from lorakern.models import fuse_projections, unfuse_projections
    from lorakern.models.fuse import is_fused
    q = _quantized(method, bias)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    n_sep, logits = _count_calls(q, IDS)
    toks = q.generate(IDS, max_new_tokens=5, do_sample=False)
    assert fuse_projections(q) == 4  # 2 layers x (attention, MLP)
    attn = q.model.layers[0].self_attn
    assert is_fused(attn) and not hasattr(attn, "q_proj") and attn.lorakern_split == [128, 64, 64]
    assert type(attn.qkv_proj) is (QuantLinear if method == "rtn" else lorakern.nn.GWQLinear)
    n_fused, fused_logits = _count_calls(q, IDS)
    assert n_sep - n_fused == 3 * 2 and torch.equal(fused_logits, logits)
    assert torch.equal(q.generate(IDS, max_new_tokens=5, do_sample=False), toks)
    assert unfuse_projections(q) == 4 and not any(is_fused(m) for m in q.modules())
    after = q.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    import pickle
    fuse_projections(q)
    mlp = q.model.layers[1].mlp
    # the fused classes are found by name (torch cannot pickle the outliers' uint16 columns: RTN layers only)
    again = pickle.loads(pickle.dumps(mlp)) if method == "rtn" else copy.deepcopy(mlp)
    h = torch.randn(2, 3, 128)
    with torch.no_grad():
        assert is_fused(again) and torch.equal(again(h), mlp(h))


def test_fused_model_saves_attaches_and_compiles(tmp_path):
    """A fused (prepare_decode) model saves as separate layers, reloads equal, stays fused after saving; an
    adapter attached to a fused projection unfuses that layer only and gives the unfused model's output;
    compiled decode of the fused model gives the eager tokens."""
    from lorakern.models.fuse import is_fused
    from lorakern.testing import save_random_peft_adapters
    q = _quantized()
    with torch.no_grad():
        want = q(IDS).logits
        lorakern.prepare_decode(q, compile=False, native=False)
        assert sum(is_fused(m) for m in q.modules()) == 4
        q.save_pretrained(tmp_path / "q")
        assert sum(is_fused(m) for m in q.modules()) == 4
        r = load_quantized_model(tmp_path / "q")
        assert not any(is_fused(m) for m in r.modules()) and torch.equal(r(IDS).logits, want)
        toks, logits = _generate(q)
        c_toks, c_logits = _generate(lorakern.prepare_decode(q, native=False))
        assert torch.equal(c_toks, toks) and (c_logits - logits).abs().max() < COMPILED_ATOL
        paths = save_random_peft_adapters(tiny_llama(seed=3, vocab_size=160, hidden_size=128, intermediate_size=256),
                                          tmp_path, {"a": ["v_proj"]}, 0.3)
        lorakern.attach_adapters(q, paths, dtype=torch.float32)
        lorakern.attach_adapters(r, paths, dtype=torch.float32)
        assert not is_fused(q.model.layers[0].self_attn) and is_fused(q.model.layers[0].mlp)
        assert torch.equal(q(IDS).logits, r(IDS).logits)


def test_lora_linear_copies_after_its_eager_call():
    """LoRALinear caches a PreparedLoRA (a C record of addresses) at its first eager CPU call; copies and pickles
    rebuild it from the copied tensors, so the copy reads its own adapter, not the original's."""
    import pickle

    from lorakern.nn import LoRALinear
    from lorakern.testing import random_compressed, random_qweight
    gen = torch.Generator().manual_seed(7)
    layer = LoRALinear(QuantLinear(random_qweight(64, 128, 4, 64, gen)), random_compressed(64, 128, 8, 2, 2, 64, 64, gen))
    x = torch.randn(3, 128, generator=gen)
    with torch.no_grad():
        y = layer(x)
        for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert torch.equal(other(x), y)
            for name in other.format_buffer_names():  # the copy's own adapter memory
                if "lora" in name and getattr(other, name).dtype == torch.float16:
                    getattr(other, name).mul_(2)
            assert not torch.equal(other(x), y)


def tiny_gemma3(seed: int = 0):
    """A random 3-layer Gemma 3 text model whose local layers see a window of 4 positions."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=160, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Gemma3ForCausalLM(cfg).eval()


def test_compiled_decode_of_sliding_window_attention_matches_eager():
    """Gemma 3's local layers under prepare_decode: the static cache keeps them full-length (transformers'
    sliding-window static layer recompiled at every decode step), the mask still limits them to their window:
    the tokens and logits of transformers' own generate (dynamic cache) over 12 steps, well past the window of
    4, for one prompt and a left-padded batch of two, eager and compiled, and one compiled graph per batch shape."""
    import pickle

    import torch._dynamo as dynamo
    from transformers.cache_utils import StaticSlidingWindowLayer
    q = lorakern.quantize_model(tiny_gemma3(), bits=4, group_size=64, progress=False)
    one = (torch.tensor([[1, 17, 33, 5, 90, 41, 8]]), None)
    two = (torch.tensor([[0, 0, 1, 17, 33, 5, 90, 41], [1, 44, 12, 9, 61, 3, 27, 150]]),
           torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]]))

    def gen(model, ids, mask):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.logits)
    with torch.no_grad():
        want = [gen(q, *p) for p in (one, two)]  # transformers' dynamic cache, sliding windows its own way
        lorakern.prepare_decode(q, compile=False, native=False)
        assert "_prepare_static_cache" not in q.__dict__  # eager: transformers' own static sliding layers
        for p, (w_toks, w_logits) in zip((one, two), want):
            toks, logits = gen(q, *p)
            # attention over a padded static cache sums in another order; a flipped int8 activation rounding in
            # the kernels makes that ~3e-3 on this random model
            assert torch.equal(toks, w_toks) and (logits - w_logits).abs().max() < COMPILED_ATOL
        lorakern.prepare_decode(q, native=False)
        dynamo.reset()
        dynamo.utils.counters.clear()
        for p, (w_toks, w_logits) in zip((one, two), want):
            toks, logits = gen(q, *p)
            assert torch.equal(toks, w_toks) and (logits - w_logits).abs().max() < COMPILED_ATOL
    assert dynamo.utils.counters["stats"]["unique_graphs"] <= 3  # prefill runs eagerly: a decode graph per batch size
    # what made it recompile: transformers' own sliding layer, which the cache prepare_decode builds has none of
    cache = q._prepare_static_cache("static", 1, 32, None, {})
    assert not any(isinstance(layer, StaticSlidingWindowLayer) for layer in cache.layers)
    assert q._prepare_static_cache.model is q
    assert copy.deepcopy(q)._prepare_static_cache.model is not q
    fresh = lorakern.prepare_decode(tiny_gemma3(), native=False)  # (not yet compiled: torch's graphs do not pickle)
    back = pickle.loads(pickle.dumps(fresh))  # the installed builder pickles with the model, bound to the copy
    assert back._prepare_static_cache.model is back
