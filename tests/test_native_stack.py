"""The native decode stack (lorakern.models.native): a whole decode step (embedding lookup, every decoder layer,
final norm, quantized head) as one lk_decoder_stack_step call, against transformers' own path on the same
quantized model, inside generate and in hand-written decode loops."""
import copy

import pytest
import torch

import lorakern
from lorakern.models import native as nm
from lorakern.nn import QuantLinear
from lorakern.testing import count_native_calls as _count_native_calls
from lorakern.testing import tiny_llama

pytest.importorskip("transformers")
from transformers import StaticCache  # noqa: E402


def _model(method="rtn", bits=4, bias=False, tie=True, head_bits=8, attn="sdpa", layers=3):
    cfg = dict(attention_bias=bias, mlp_bias=bias, num_hidden_layers=layers, attn_implementation=attn,
               tie_word_embeddings=tie)
    fp = tiny_llama(seed=11, vocab_size=160, hidden_size=128, intermediate_size=192, **cfg)
    kw = dict(method="magnitude", dense="rtn", outliers=0.02) if method == "gwq" else {}
    return lorakern.quantize_model(fp, bits=bits, group_size=32, head_bits=head_bits, progress=False, **kw)


def _pair(q):
    """(the model on transformers' path, the same model on the native path)."""
    ref = lorakern.prepare_decode(copy.deepcopy(q), compile=False, native=False)
    nat = lorakern.prepare_decode(copy.deepcopy(q))
    return ref, nat


def _close(got, want, rel=2e-3):
    """Logits within ``rel`` of the largest |logit|: the native step sums in another fp32 order, and an ulp can
    move an int8 activation code one step (tests/test_native_decode.py measures it)."""
    scale = want.abs().max().clamp_min(1.0)
    assert (got - want).abs().max() <= rel * scale * 10, float((got - want).abs().max() / scale)


@pytest.mark.parametrize("kind", ["rtn4_tied", "rtn3_bias_untied", "gwq4", "fp32_head", "eager_attn"])
@pytest.mark.parametrize("batch", [1, 3])
def test_stack_generate_matches_transformers_path(kind, batch):
    q = {"rtn4_tied": lambda: _model(),
         "rtn3_bias_untied": lambda: _model(bits=3, bias=True, tie=False),
         "gwq4": lambda: _model(method="gwq"),
         "fp32_head": lambda: _model(head_bits=None, tie=False),
         "eager_attn": lambda: _model(attn="eager")}[kind]()
    ref, nat = _pair(q)
    ids = torch.randint(3, 160, (batch, 7), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding
        mask[1, :3] = 0
        mask[2, :1] = 0
    kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        stacks = []
        with _count_native_calls(stacks) as calls:
            got = nat.generate(ids, **kw)
    assert len(stacks) == 6 and len(calls) == 6 * 3  # every decode step was one stack call
    st = nm._STACKS[nat]
    assert st.c_rope and st.c_norm
    assert st.c_embed == (kind in ("rtn4_tied", "gwq4", "eager_attn"))  # a tied table is a QuantEmbedding
    assert st.c_head == (kind != "fp32_head")
    assert torch.equal(got.sequences, want.sequences)
    _close(torch.stack(got.logits), torch.stack(want.logits))


def _decode_loop(model, ids, steps, mask=None, between=None):
    """Prefill and ``steps`` decode steps by hand (forward calls with a static cache, greedy); ``between(i)`` runs
    before decode step i. Returns the logits of every step [steps + 1, B, vocab]."""
    B, S = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=S + steps + 1)
    outs = []
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        outs.append(o.logits[:, -1])
        for i in range(steps):
            if between is not None:
                between(i)
            nxt = outs[-1].argmax(-1, keepdim=True)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            o = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
            outs.append(o.logits[:, -1])
    return torch.stack(outs)


def test_stack_in_a_hand_written_loop_with_a_2d_mask():
    ref, nat = _pair(_model())
    ids = torch.randint(3, 160, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    stacks = []
    with _count_native_calls(stacks):
        got = _decode_loop(nat, ids, 4, mask)
    assert len(stacks) == 4
    _close(got, _decode_loop(ref, ids, 4, mask))


def test_stack_sees_a_module_assigned_between_steps():
    """A projection replaced in the middle of a run of decode steps is used from the next step on."""
    q = _model()
    ref, nat = _pair(q)
    gen = torch.Generator().manual_seed(5)
    new = lorakern.quantize_rtn(torch.randn(128, 192, generator=gen) * 0.05, bits=4, group_size=32)

    def swap(model):
        def between(i):
            if i == 2:
                model.model.layers[1].mlp.down_proj = QuantLinear(new)
        return between
    ids = torch.randint(3, 160, (1, 5), generator=gen)
    built = []
    real = nm._Stack.__init__

    def counting(self, *a):
        built.append(1)
        real(self, *a)
    nm._Stack.__init__ = counting
    try:
        got = _decode_loop(nat, ids, 4, between=swap(nat))
    finally:
        nm._Stack.__init__ = real
    assert len(built) == 2  # built at the first decode step, rebuilt after the assignment
    _close(got, _decode_loop(ref, ids, 4, between=swap(ref)))


def test_stack_declines_what_it_does_not_take():
    q = _model()
    ref, nat = _pair(q)
    ids = torch.randint(3, 160, (1, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None, output_hidden_states=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        stacks = []
        with _count_native_calls(stacks) as calls:
            got = nat.generate(ids, **kw)
        want = ref.generate(ids, **kw)
    assert not stacks and len(calls) == 3 * 3  # hidden states asked for: the per-layer native step
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.hidden_states[-1]) == len(want.hidden_states[-1])
    for a, b in zip(got.hidden_states[-1], want.hidden_states[-1]):
        _close(a, b)
    # transformers' output-capturing hooks stay on the layers for good; they do not keep the stack off
    stacks = []
    with torch.no_grad(), _count_native_calls(stacks):
        nat.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert len(stacks) == 3
    # a forward hook on a layer (on a fresh model): that layer must run as a module
    nat = lorakern.prepare_decode(copy.deepcopy(q))
    seen = []
    h = nat.model.layers[1].register_forward_hook(lambda *a: seen.append(1))
    try:
        stacks = []
        with torch.no_grad(), _count_native_calls(stacks):
            nat.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    finally:
        h.remove()
    assert not stacks and len(seen) == 4  # prefill and 3 decode steps through the hook
    # gradients enabled: transformers' path
    cache = StaticCache(config=nat.config, max_cache_len=8)
    with torch.no_grad():
        nat(input_ids=ids, cache=cache, use_cache=True)
    with _count_native_calls() as calls:
        nat(input_ids=ids[:, :1], cache=cache, use_cache=True)
    assert not calls


def test_stack_refuses_token_ids_outside_the_table():
    q = _model()
    nat = lorakern.prepare_decode(q)
    ids = torch.randint(3, 160, (2, 4), generator=torch.Generator().manual_seed(3))
    cache = StaticCache(config=nat.config, max_cache_len=8)
    with torch.no_grad():
        nat(input_ids=ids, cache=cache, use_cache=True)
        nat(input_ids=ids[:, :1], cache=cache, use_cache=True)  # a native step: the stack is built
        assert nm._STACKS[nat].c_embed
        before = [int(l.cumulative_length) for l in cache.layers]
        keys = cache.layers[0].keys.clone()
        for bad in (160, -1):
            with pytest.raises(IndexError, match="token id"):
                nat(input_ids=torch.tensor([[5], [bad]]), cache=cache, use_cache=True)
        assert [int(l.cumulative_length) for l in cache.layers] == before  # nothing written
        assert torch.equal(cache.layers[0].keys, keys)


def test_stack_c_abi_refuses_caches_out_of_step():
    q = lorakern.prepare_decode(_model())
    ids = torch.randint(3, 160, (1, 4), generator=torch.Generator().manual_seed(4))
    cache = StaticCache(config=q.config, max_cache_len=8)
    with torch.no_grad():
        q(input_ids=ids, cache=cache, use_cache=True)
        q(input_ids=ids[:, :1], cache=cache, use_cache=True)
    st = nm._STACKS[q]
    lengths, keys, values, L, _ = st.cache_pointers(cache, 1)
    y = torch.empty(1, st.out_features)
    tok = torch.tensor([7])
    cache.layers[2].cumulative_length.add_(1)  # layer 2 one position ahead
    from lorakern._native import native
    with pytest.raises(RuntimeError, match="invalid argument"):
        native().decoder_stack_step(st.stack, 1, tok.data_ptr(), 0, 0, 0, 0, lengths, keys, values, L, 0,
                                    y.data_ptr(), 1)
    assert [int(l.cumulative_length) for l in cache.layers] == [5, 5, 6]
    with pytest.raises(ValueError):
        native().decoder_stack_step(st.stack, 1, tok.data_ptr(), 0, 0, 0, 0, lengths[:2], keys, values, L, 0,
                                    y.data_ptr(), 1)
    with pytest.raises(ValueError):
        native().DecoderStackRecord([], [], 0, 1.0, 0, 0.0, [], 0)


def test_disable_gives_transformers_classes_back():
    from transformers.models.llama import modeling_llama as ml
    q = lorakern.prepare_decode(_model())
    assert type(q).__name__ == "NativeLlamaForCausalLM" and type(q.model).__name__ == "NativeLlamaModel"
    nm.disable_native_decode(q)
    assert type(q) is ml.LlamaForCausalLM and type(q.model) is ml.LlamaModel
    assert q not in nm._STACKS


def test_stack_follows_beam_search_reordering():
    """Beam search replaces the static cache's tensors each step (reorder_cache): the stack must follow them."""
    ref, nat = _pair(_model())
    ids = torch.randint(3, 160, (2, 5), generator=torch.Generator().manual_seed(8))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        stacks = []
        with _count_native_calls(stacks):
            got = nat.generate(ids, **kw)
    assert len(stacks) == 5
    assert torch.equal(got.sequences, want.sequences)
    _close(torch.stack(got.scores), torch.stack(want.scores))


def test_stack_takes_inputs_embeds_on_a_tied_quantized_table():
    ref, nat = _pair(_model())
    ids = torch.randint(3, 160, (2, 5), generator=torch.Generator().manual_seed(9))
    outs = []
    for model in (ref, nat):
        cache = StaticCache(config=model.config, max_cache_len=8)
        with torch.no_grad():
            model(input_ids=ids, cache=cache, use_cache=True)
            model(input_ids=ids[:, :1], cache=cache, use_cache=True)
            emb = model.model.embed_tokens(ids[:, 1:2])
            stacks = []
            with _count_native_calls(stacks):
                outs.append(model(inputs_embeds=emb, cache=cache, use_cache=True).logits)
        assert len(stacks) == (model is nat)
    assert nm._STACKS[nat].c_embed
    _close(outs[1], outs[0])


def test_generate_skips_the_4d_mask_during_native_runs():
    """prepare_inputs_for_generation passes the 2-D mask on during a run of native steps: transformers' mask
    builder runs for the prefill only."""
    import transformers.generation.utils as gu
    ref, nat = _pair(_model())
    ids = torch.randint(3, 160, (2, 5), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    built = []
    real = gu.create_masks_for_generate

    def counting(*a, **k):
        built.append(1)
        return real(*a, **k)
    gu.create_masks_for_generate = counting
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
              output_logits=True, return_dict_in_generate=True)
    try:
        with torch.no_grad():
            got = nat.generate(ids, **kw)
            n_native = len(built)
            want = ref.generate(ids, **kw)
    finally:
        gu.create_masks_for_generate = real
    assert n_native <= 2 and len(built) - n_native == 6  # (transformers' path: every step)
    assert torch.equal(got.sequences, want.sequences)
    _close(torch.stack(got.logits), torch.stack(want.logits))


def test_global_forward_hooks_turn_the_stack_off():
    nat = lorakern.prepare_decode(_model())
    ids = torch.randint(3, 160, (1, 5), generator=torch.Generator().manual_seed(12))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        nat.generate(ids, **kw)  # the stack is built
        seen = []
        h = torch.nn.modules.module.register_module_forward_hook(lambda *a: seen.append(1))
        try:
            stacks = []
            with _count_native_calls(stacks):
                nat.generate(ids, **kw)
        finally:
            h.remove()
    assert not stacks and seen
