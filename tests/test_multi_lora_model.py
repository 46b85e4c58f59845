"""attach_adapters on Hugging Face models: a batch whose samples each use a different adapter gives
what PEFT gives (its mixed-adapter batch, and each adapter alone); generate works the same way."""
import copy

import pytest
import torch

import lorakern
from lorakern.nn import MultiLoRALinear


@pytest.fixture(scope="module")
def tiny_model_and_adapters(tmp_path_factory):
    """A tiny random Llama and three saved PEFT adapters of different ranks and target modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    specs = {"qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             "attn8": dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
             "mlp2": dict(r=2, lora_alpha=2, target_modules=["gate_proj", "up_proj", "down_proj"])}
    paths = {}
    for name, spec in specs.items():
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **spec))
        paths[name] = tmp_path_factory.mktemp(name)
        pm.save_pretrained(paths[name])
    return model, paths


def peft_model(model, paths):
    from peft import PeftModel
    names = list(paths)
    pm = PeftModel.from_pretrained(copy.deepcopy(model), paths[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(paths[n], adapter_name=n)
    return pm.eval()


def test_mixed_batch_matches_peft(tiny_model_and_adapters):
    model, paths = tiny_model_and_adapters
    pm = peft_model(model, paths)
    names = ["attn8", "__base__", "qv4", "mlp2", "qv4"]
    ids = torch.randint(0, 101, (len(names), 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm(input_ids=ids, adapter_names=names).logits
        alone = []
        for i, n in enumerate(names):  # each adapter alone
            if n == "__base__":
                with pm.disable_adapter():
                    alone.append(pm(input_ids=ids[i:i + 1]).logits)
            else:
                pm.set_adapter(n)
                alone.append(pm(input_ids=ids[i:i + 1]).logits)
        alone = torch.cat(alone)
    lm = copy.deepcopy(model)
    bank = lorakern.attach_adapters(lm, paths, dtype=torch.float32)
    assert sorted(bank.names) == sorted(paths)
    assert isinstance(lm.model.layers[0].self_attn.q_proj, MultiLoRALinear)
    with torch.no_grad():
        got = lm(input_ids=ids, adapter_names=names).logits
        plain = lm(input_ids=ids).logits  # no names: the base model
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale, (got - want).abs().max()
    assert (got - alone).abs().max() <= 1e-5 * scale
    with torch.no_grad():
        base = model(input_ids=ids).logits
    assert torch.allclose(plain, base, atol=1e-6)
    assert not torch.allclose(got[0], base[0], atol=1e-3)  # the adapters do something


def test_generate_matches_peft(tiny_model_and_adapters):
    model, paths = tiny_model_and_adapters
    pm = peft_model(model, paths)
    names = ["mlp2", "attn8", "__base__"]
    ids = torch.randint(1, 101, (3, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = pm.generate(input_ids=ids, adapter_names=names, **kw)
        lm = copy.deepcopy(model)
        lorakern.attach_adapters(lm, paths, dtype=torch.float32)
        got = lm.generate(input_ids=ids, adapter_names=names, **kw)
    assert torch.equal(got, want)


def test_bank_changes_at_run_time_and_detach(tiny_model_and_adapters):
    model, paths = tiny_model_and_adapters
    lm = copy.deepcopy(model)
    bank = lorakern.attach_adapters(lm, {"qv4": paths["qv4"], "attn8": paths["attn8"]}, dtype=torch.float16)
    ids = torch.randint(0, 101, (2, 4))
    with torch.no_grad():
        a = lm(input_ids=ids, adapter_names=["qv4", "attn8"]).logits
        bank.remove("attn8")
        with pytest.raises(KeyError, match="no adapter 'attn8'"):
            lm(input_ids=ids, adapter_names=["qv4", "attn8"])
        b = lm(input_ids=ids, adapter_names=["qv4", "__base__"]).logits
        bank.add("attn8", paths["attn8"])
        c = lm(input_ids=ids, adapter_names=["qv4", "attn8"]).logits
        with pytest.raises(ValueError, match="one adapter name per sample"):
            lm(input_ids=ids, adapter_names=["qv4", "attn8", "qv4"])
        with pytest.raises(ValueError, match="does not know"):  # mlp modules are not in the bank
            bank.add("mlp2", paths["mlp2"])
    assert torch.equal(a[0], b[0]) and torch.equal(a, c)
    lorakern.detach_adapters(lm)
    assert type(lm.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, model(input_ids=ids).logits)


def test_attach_refuses_bad_adapters(tiny_model_and_adapters, tmp_path):
    model, paths = tiny_model_and_adapters
    lm = copy.deepcopy(model)
    with pytest.raises(Exception, match="adapter_config.json|not a PEFT|No such|does not exist|no "):
        lorakern.attach_adapters(lm, {"x": tmp_path})
    with pytest.raises(ValueError, match="__base__"):
        lorakern.attach_adapters(lm, {"__base__": paths["qv4"]})
    assert type(lm.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # nothing changed


@pytest.mark.slow
def test_smollm2_mixed_batch_matches_peft(tmp_path):
    """The real SmolLM2-135M with the LoRAQuant suite's adapters (random PEFT adapters when the suite
    is not trained on this machine): lorakern's mixed batch against PEFT running each adapter alone."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from lorakern.models import load_smollm2
    from lorakern.apps.train.suite import adapter_dir
    model, tok = load_smollm2()
    model.eval()
    names = ["add", "reverse", "sort", "count"]
    paths = {}
    for n in names:
        d = adapter_dir(n)
        if not (d / "adapter_config.json").is_file():
            pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                                                                 target_modules=["q_proj", "v_proj"]))
            d = tmp_path / n
            pm.save_pretrained(d)
        paths[n] = d
    prompts = ["12+7=", "reverse: abc ->", "sort: d b a ->", "count a in banana:", "The capital of France"]
    batch_names = names + ["__base__"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    pm = PeftModel.from_pretrained(copy.deepcopy(model), paths[names[0]], adapter_name=names[0]).eval()
    for n in names[1:]:
        pm.load_adapter(paths[n], adapter_name=n)
    want = []
    with torch.no_grad():
        for i, n in enumerate(batch_names):
            one = {k: v[i:i + 1] for k, v in enc.items()}
            if n == "__base__":
                with pm.disable_adapter():
                    want.append(pm(**one).logits)
            else:
                pm.set_adapter(n)
                want.append(pm(**one).logits)
        want = torch.cat(want)
        lm = copy.deepcopy(model)
        lorakern.attach_adapters(lm, paths, dtype=torch.float32)
        got = lm(**enc, adapter_names=batch_names).logits
    mask = enc["attention_mask"].bool()
    err = (got - want).abs()[mask].max()
    assert err <= 1e-4 * want.abs()[mask].max(), err


def test_compressed_and_dense_adapters_in_one_batch(tiny_model_and_adapters):
    """A compressed adapter in the bank gives what LoRALinear gives with that adapter alone."""
    from lorakern.adapters import apply_adapter, compress_adapter, load_peft_adapter
    model, paths = tiny_model_and_adapters
    comp = compress_adapter(load_peft_adapter(paths["attn8"]), rho=0.9, bits_high=3)
    ids = torch.randint(0, 101, (3, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with apply_adapter(model, comp):
            want0 = model(input_ids=ids[:1]).logits
        lm = copy.deepcopy(model)
        lorakern.attach_adapters(lm, {"attn8c": comp, "qv4": paths["qv4"]}, dtype=torch.float32)
        got = lm(input_ids=ids, adapter_names=["attn8c", "qv4", "__base__"]).logits
        base = model(input_ids=ids[2:]).logits
    assert (got[:1] - want0).abs().max() <= 1e-4 * want0.abs().max()
    assert (got[2:] - base).abs().max() <= 1e-6 * base.abs().max()


def test_mixture_per_sample(tiny_model_and_adapters):
    """Per-sample k-way mixtures through the context: weight 1/0 is the adapter alone; 0.5/0.5 is neither."""
    model, paths = tiny_model_and_adapters
    lm = copy.deepcopy(model)
    bank = lorakern.attach_adapters(lm, paths, dtype=torch.float32)
    ids = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(4))
    a, b = bank.id("qv4"), bank.id("attn8")
    with torch.no_grad():
        alone = lm(input_ids=ids, adapter_names=["qv4", "attn8"]).logits
        with lm.lorakern_context.use([[a, b], [b, -1]], weights=[[1.0, 0.0], [1.0, 0.0]]):
            mixed_one = lm(input_ids=ids).logits
        with lm.lorakern_context.use([[a, b], [a, b]], weights=[[0.5, 0.5], [0.5, 0.5]]):
            half = lm(input_ids=ids).logits
    assert (mixed_one - alone).abs().max() <= 1e-5 * alone.abs().max()
    assert not torch.allclose(half[0], alone[0], atol=1e-4) and not torch.allclose(half[1], alone[1], atol=1e-4)
