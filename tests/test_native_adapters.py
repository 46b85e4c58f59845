"""Adapter banks inside the native decode step (lorakern.models.native): every sequence of a decode step on its own
adapter (dense or LoRAQuant-compressed, a mixture, or none), applied in C++ by the multi-adapter kernels inside
lk_decoder_stack_step / lk_decoder_layer_step, against transformers' path on the same model and bank (whose
MultiLoRALinear layers tests/test_multi_lora_model.py checks against PEFT)."""
import copy

import pytest
import torch

import lorakern
from lorakern.adapters import LoraLayer
from lorakern.models import native as nm
from lorakern.models.fuse import fuse_projections, unfuse_projections
from lorakern.nn import MultiLoRALinear, MultiLoRASlicesLinear, QuantLinear
from lorakern.testing import count_native_calls, random_compressed, tiny_llama

pytest.importorskip("transformers")

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantized(seed=5, bits=4):
    fp = tiny_llama(seed=seed, vocab_size=150, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                    tie_word_embeddings=True)
    return lorakern.quantize_model(fp, bits=bits, group_size=32, head_bits=8, progress=False)


def _adapters(q, gen):
    """Two dense adapters (one without k_proj and gate_proj: fused slices without a bank), one compressed, one
    touching the attention only. Factors large enough that every adapter moves the logits."""
    shapes = {n: (m.out_features, m.in_features) for n, m in q.named_modules() if n.split(".")[-1] in PROJ}

    def dense(rank, skip=()):
        return {n: LoraLayer(torch.randn(rank, K, generator=gen) * 0.2, torch.randn(N, rank, generator=gen) * 0.2, 1.5)
                for n, (N, K) in shapes.items() if n.split(".")[-1] not in skip}
    comp = {n: random_compressed(N, K, 8, 3, 2, 32, 32, gen, scale=0.3) for n, (N, K) in shapes.items()}
    attn = {n: l for n, l in dense(4).items() if "self_attn" in n}
    return {"d8": dense(8), "d5": dense(5, skip=("k_proj", "gate_proj")), "c8": comp, "attn4": attn}


def _pair(q, adapters, dtype=torch.float16):
    """(transformers' path, the native path): the same quantized model and bank."""
    ref = copy.deepcopy(q)
    lorakern.attach_adapters(ref, adapters, dtype=dtype)
    lorakern.prepare_decode(ref, compile=False, native=False)
    nat = copy.deepcopy(q)
    lorakern.attach_adapters(nat, adapters, dtype=dtype)
    lorakern.prepare_decode(nat, compile=False)
    return ref, nat


def _close(got, want, rel=2e-3):
    """Within ``rel`` of the largest |logit| (the native step sums in another fp32 order; an ulp can move an int8
    activation code one step, as in tests/test_native_stack.py)."""
    scale = want.abs().max().clamp_min(1.0)
    assert (got - want).abs().max() <= rel * scale, float((got - want).abs().max() / scale)


def _generate(model, ids, names, mask=None, steps=6, **kw):
    args = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0, eos_token_id=None, **kw)
    with torch.no_grad():
        return model.generate(ids, adapter_names=names, **args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_mixed_adapter_batch_runs_in_the_stack_step(dtype):
    q = _quantized()
    ref, nat = _pair(q, _adapters(q, torch.Generator().manual_seed(0)), dtype)
    # the bank's projections are fused around it, and every layer qualifies
    attn = nat.model.layers[0].self_attn
    assert type(attn.qkv_proj) is MultiLoRASlicesLinear and type(attn.o_proj) is MultiLoRALinear
    assert nm.native_decode_layers(nat)[:2] == (3, 3)
    names = ["d8", "__base__", "c8", "d5", "attn4", "c8", "d8"]
    ids = torch.randint(3, 150, (len(names), 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[4, :1] = 0
    want = _generate(ref, ids, names, mask)
    stacks = []
    with count_native_calls(stacks):
        got = _generate(nat, ids, names, mask)
    assert len(stacks) == 5  # every decode step was one stack call
    assert nm._STACKS[nat].context is nat.lorakern_context
    assert torch.equal(got.sequences, want.sequences)
    _close(torch.stack(got.logits), torch.stack(want.logits))
    base = _generate(nat, ids, None, mask)  # no names: the base model, also natively
    diff = (torch.stack(got.logits) - torch.stack(base.logits)).abs().amax((0, 2))
    scale = torch.stack(base.logits).abs().max()
    assert bool((diff[[0, 2, 3, 4, 5, 6]] > 1e-2 * scale).all())  # every adapter moves its sequence's logits
    assert float(diff[1]) <= 2e-3 * scale  # the base sequence is the base model


def test_per_sample_mixtures_match_transformers_path():
    q = _quantized(seed=6)
    ref, nat = _pair(q, _adapters(q, torch.Generator().manual_seed(2)))
    bank = nat.lorakern_bank
    ids = torch.randint(3, 150, (3, 5), generator=torch.Generator().manual_seed(3))
    mix = torch.tensor([[bank.id("d8"), bank.id("c8")], [bank.id("d5"), -1], [bank.id("attn4"), bank.id("d8")]])
    w = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.25, 0.75]])
    out = []
    for m in (ref, nat):
        with m.lorakern_context.use(mix, w), torch.no_grad():
            out.append(m.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=0, eos_token_id=None))
    assert torch.equal(out[0].sequences, out[1].sequences)
    _close(torch.stack(out[1].logits), torch.stack(out[0].logits))


def test_layer_step_takes_the_batch_when_the_stack_declines():
    """output_hidden_states sends the step to transformers' forward, whose layers take their own native step with
    the same batch."""
    q = _quantized(seed=7)
    ref, nat = _pair(q, _adapters(q, torch.Generator().manual_seed(4)))
    names = ["c8", "d5"]
    ids = torch.randint(3, 150, (2, 5), generator=torch.Generator().manual_seed(5))
    stacks = []
    with count_native_calls(stacks) as calls:
        got = _generate(nat, ids, names, output_hidden_states=True)
    want = _generate(ref, ids, names, output_hidden_states=True)
    assert not stacks and len(calls) == 5 * 3
    assert torch.equal(got.sequences, want.sequences)
    _close(torch.stack(got.logits), torch.stack(want.logits))


def test_bank_changes_between_calls_rebuild_the_record():
    q = _quantized(seed=8)
    gen = torch.Generator().manual_seed(6)
    ads = _adapters(q, gen)
    ref, nat = _pair(q, {"d8": ads["d8"]})
    ids = torch.randint(3, 150, (2, 5), generator=torch.Generator().manual_seed(7))
    first = _generate(nat, ids, ["d8", "__base__"])
    for m in (ref, nat):  # the slabs grow and move: the next step must read the new ones
        for i in range(20):
            m.lorakern_bank.add(f"c{i}", ads["c8"])
        m.lorakern_bank.add("d5", ads["d5"])
    names = ["c19", "d5"]
    want = _generate(ref, ids, names)
    with count_native_calls() as calls:
        got = _generate(nat, ids, names)
    assert len(calls) == 5 * 3
    assert torch.equal(got.sequences, want.sequences)
    _close(torch.stack(got.logits), torch.stack(want.logits))
    again = _generate(nat, ids, ["d8", "__base__"])
    _close(torch.stack(again.logits), torch.stack(first.logits), rel=1e-6)
    # a removed adapter named by a batch built before the removal: a clear error from the C step, no crash
    ctx = nat.lorakern_context
    with ctx.use(["c3", "d5"]):
        nat.lorakern_bank.remove("c3")
        with pytest.raises(ValueError, match="removed"):
            with torch.no_grad():
                nat.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)


def test_detach_and_unfuse_give_the_layers_back():
    q = _quantized(seed=9)
    ads = _adapters(q, torch.Generator().manual_seed(8))
    _, nat = _pair(q, ads)
    plain = lorakern.prepare_decode(copy.deepcopy(q), compile=False)
    ids = torch.randint(3, 150, (2, 5), generator=torch.Generator().manual_seed(9))
    # unfusing gives the MultiLoRALinear of each projection back (the slices' banks, a bare layer where none)
    attn = nat.model.layers[0].self_attn
    banks = attn.qkv_proj.banks
    unfuse_projections(nat.model.layers[0])
    assert type(attn.q_proj) is MultiLoRALinear and type(nat.model.layers[0].mlp.up_proj) is MultiLoRALinear
    assert attn.q_proj.bank is banks[0] and attn.v_proj.bank is banks[2]
    assert nm.native_decode_layers(nat)[0] == 2  # (that layer runs transformers' path now)
    # detaching gives the bare quantized layers back: fused where they were fused, separate where not
    lorakern.detach_adapters(nat)
    assert type(nat.model.layers[1].self_attn.qkv_proj) is QuantLinear and type(attn.q_proj) is QuantLinear
    assert not any(isinstance(m, (MultiLoRALinear, MultiLoRASlicesLinear)) for m in nat.modules())
    fuse_projections(nat)
    with count_native_calls() as calls:
        got = _generate(nat, ids, None)
    assert len(calls) == 5 * 3
    want = _generate(plain, ids, None)
    assert torch.equal(got.sequences, want.sequences)
    _close(torch.stack(got.logits), torch.stack(want.logits), rel=1e-6)


def test_layer_step_refuses_a_batch_outside_the_bank():
    """The C step checks the batch's slots and tokens against the layer's banks before it writes anything."""
    q = _quantized(seed=10)
    _, nat = _pair(q, _adapters(q, torch.Generator().manual_seed(10)))
    rec = nm._record_of(nat.model.layers[0])
    assert rec is not None and len(rec.banks) == 7 and rec.context is nat.lorakern_context
    H, _, Hkv, D, _ = rec.dims
    B, L = 2, 8
    x, cos, sin = torch.randn(B, H), torch.ones(B, D), torch.zeros(B, D)
    kc, vc = torch.zeros(B, Hkv, L, D), torch.zeros(B, Hkv, L, D)
    y = torch.full((B, H), float("nan"))
    w = torch.ones(1)
    step = nm.native().decoder_layer_step

    def run(slot, token):
        seg, tok = torch.tensor([[slot, 0, 1]]), torch.tensor([token])
        step(rec.record, x.data_ptr(), B, cos.data_ptr(), sin.data_ptr(), 0, kc.data_ptr(), vc.data_ptr(), L, 0,
             y.data_ptr(), 1, seg.data_ptr(), 1, tok.data_ptr(), w.data_ptr(), 1)
    with pytest.raises(IndexError, match="outside a layer's bank"):
        run(10**6, 0)
    with pytest.raises(ValueError, match="removed"):
        run(nat.lorakern_bank.num_slots, 0)  # (the table has spare empty rows)
    with pytest.raises(RuntimeError, match="invalid argument"):
        run(0, B)  # a token outside the step's rows
    assert not kc.any() and not vc.any() and bool(y.isnan().all())
    run(nat.lorakern_bank.id("c8"), 1)
    assert bool(torch.isfinite(y).all()) and kc.any()
