"""lorakern against PEFT itself on adapters PEFT writes: pattern keys, config fields, lm_head /
embedding adapters, saving mixed ranks and scales, adapter_names, GPT-2's Conv1D layers."""
import copy
import dataclasses
import json
import math

import pytest
import torch

import lorakern
from lorakern.adapters import (LoraAdapter, LoraLayer, apply_adapter, compress_adapter, load_peft_adapter,
                               save_peft_adapter)
from lorakern.adapters.peft_config import FIELDS, pattern_key
from lorakern.formats import FormatError

peft = pytest.importorskip("peft")


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=64, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def peft_save(model, tmp_path, name, **cfg):
    """An adapter made by PEFT with random (trained-like) weights, saved by PEFT; returns (dir, the adapter as
    ``PeftModel.from_pretrained`` loads it). The reloaded model is the reference: PEFT writes the config with
    sorted keys, so with several matching pattern keys the in-memory model and the file can disagree (the
    first key of the file wins when PEFT loads it, and lorakern follows the file)."""
    cfg.setdefault("init_lora_weights", False)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)).eval()
    d = tmp_path / name
    pm.save_pretrained(d)
    return d, peft.PeftModel.from_pretrained(copy.deepcopy(model), d).eval()


def peft_scales(pm) -> dict:
    """{module name relative to the base model: (rank, scaling)} as PEFT built them."""
    out = {}
    for n, m in pm.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in m.scaling:
            out[n.removeprefix("base_model.model.")] = (m.r["default"], m.scaling["default"])
    return out


IDS = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))

# keys that PEFT reads as regexes matched at the end of a module name on a dot boundary
PATTERNS = [
    {"q_proj|k_proj": 32},
    {"mlp.(up|down)_proj": 16},
    {r"self_attn\.[qk]_proj": 4},
    {r"layers\.0\..*v_proj": 2},
    {"proj": 64},                                          # no dot boundary: matches nothing
    {"q_proj": 4, r"layers\.0\.self_attn\.q_proj": 64},    # both match layer 0's q: the first key wins
    {r"layers\.0\.self_attn\.q_proj": 64, "q_proj": 4},
    {"model.layers.1.mlp.down_proj": 12},                  # a full name
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=[str(i) for i in range(len(PATTERNS))])
def test_alpha_pattern_keys_match_peft(pattern, tmp_path):
    model = tiny_llama()
    d, pm = peft_save(model, tmp_path, "a", r=4, lora_alpha=8, alpha_pattern=pattern,
                      target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    ad = load_peft_adapter(d)
    want = peft_scales(pm)
    assert set(ad.layers) == set(want)
    for m, layer in ad.layers.items():
        assert (layer.rank, layer.scale) == want[m], m
    with torch.no_grad(), apply_adapter(model, ad):
        ours = model(IDS).logits
        ref = pm(IDS).logits
    assert (ours - ref).abs().max() < 1e-5


@pytest.mark.parametrize("pattern", PATTERNS, ids=[str(i) for i in range(len(PATTERNS))])
def test_rank_pattern_keys_match_peft(pattern, tmp_path):
    model = tiny_llama()
    ranks = {k: max(1, v // 4) for k, v in pattern.items()}
    cfg = dict(r=4, lora_alpha=8, rank_pattern=ranks, target_modules=["q_proj", "k_proj", "v_proj", "up_proj",
                                                                      "down_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)).eval()
    d = tmp_path / "r"
    pm.save_pretrained(d)
    try:
        ref = peft.PeftModel.from_pretrained(copy.deepcopy(model), d).eval()
    except RuntimeError:  # PEFT's sorted save reordered overlapping keys: PEFT cannot load its own file
        with pytest.raises(FormatError, match="rank"):
            load_peft_adapter(d)
        return
    ad = load_peft_adapter(d)  # PEFT loads it, so lorakern must too
    want = peft_scales(ref)
    for m, layer in ad.layers.items():
        assert (layer.rank, layer.scale) == want[m], m
    with torch.no_grad(), apply_adapter(model, ad):
        assert (model(IDS).logits - ref(IDS).logits).abs().max() < 1e-5


def test_pattern_key_is_pepts_rule():
    from peft.utils.other import get_pattern_key
    names = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.up_proj", "lm_head", "model.layers.1.self_attn.o_proj"]
    keys_list = [["q_proj"], ["proj"], [r"layers\.1\d*\..*"], ["o_proj|up_proj", "up_proj"], ["lm_head"], ["head"],
                 [r"model\.layers\.0\.self_attn\.q_proj"], ["mlp.up_proj", "up_proj"]]
    for keys in keys_list:
        for n in names:
            theirs = get_pattern_key(keys, n)
            assert pattern_key(keys, n) == (theirs if theirs in keys else None), (keys, n)


# --- config fields -------------------------------------------------------------------------------------

def _write_config(src, dst, **changes):
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture
def plain_adapter(tmp_path):
    d, pm = peft_save(tiny_llama(), tmp_path, "plain", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return d


@pytest.mark.parametrize("field,value,words", [
    ("alora_invocation_tokens", [5, 7], "aLoRA"),
    ("use_dora", True, "DoRA"),
    ("lora_bias", True, "bias on lora_B"),
    ("bias", "all", "base-layer biases"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("trainable_token_indices", [1, 2], "trainable tokens"),
    ("layer_replication", [[0, 2], [1, 2]], "layer replication"),
    ("target_parameters", ["mlp.experts.gate_up_proj"], "nn.Parameter"),
    ("init_lora_weights", "pissa", "rewrites the base model"),
    ("init_lora_weights", "olora", "rewrites the base model"),
    ("init_lora_weights", "loftq", "rewrites the base model"),
    ("a_future_peft_feature", {"mode": 2}, "unknown adapter_config field"),
])
def test_math_changing_fields_are_refused_by_name(plain_adapter, tmp_path, field, value, words):
    d = _write_config(plain_adapter, tmp_path / "x", **{field: value})
    with pytest.raises(FormatError, match=words):
        load_peft_adapter(d)


def test_harmless_field_values_are_accepted(plain_adapter, tmp_path):
    d = _write_config(plain_adapter, tmp_path / "x", lora_dropout=0.1, init_lora_weights="gaussian",
                      layers_to_transform=[0, 1], a_future_metadata_field=None, inference_mode=False)
    assert len(load_peft_adapter(d).layers) == 4


def test_every_lora_config_field_is_classified():
    """A PEFT release that adds a LoraConfig field shows up here (unknown fields are refused when set)."""
    names = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert names - set(FIELDS) == set()


def test_alora_is_refused_where_peft_changes_the_output(tmp_path):
    """aLoRA changes the math (PEFT applies it only from the invocation tokens on): show it, then refuse."""
    model = tiny_llama()
    d, pm = peft_save(model, tmp_path, "al", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      alora_invocation_tokens=[int(IDS[0, 4])])
    plain = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=["q_proj", "v_proj"]))
    plain.load_state_dict(pm.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(pm(IDS[:1]).logits, plain.eval()(IDS[:1]).logits)
    with pytest.raises(FormatError, match="aLoRA"):
        load_peft_adapter(d)


# --- lm_head / embed_tokens ----------------------------------------------------------------------------

def _both_paths_match_peft(model, pm, ad, name, d):
    """The adapter attached alone (apply_adapter) and through a bank (attach_adapters on a copy) both give
    PEFT's logits; returns (PEFT's logits, the copy with the bank)."""
    ref = pm(IDS).logits
    with apply_adapter(model, ad):
        assert (model(IDS).logits - ref).abs().max() < 1e-5
    lm = copy.deepcopy(model)
    lorakern.attach_adapters(lm, {name: d}, dtype=torch.float32)
    assert (lm(IDS, adapter_names=[name, name]).logits - ref).abs().max() < 1e-5
    return ref, lm


def test_lm_head_adapter_with_base_weight_copy(tmp_path):
    model = tiny_llama()
    d, pm = peft_save(model, tmp_path, "head", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    ad = load_peft_adapter(d)
    assert "lm_head" in ad.layers and list(ad.base_weights) == ["lm_head"]
    with torch.no_grad():
        ref, lm = _both_paths_match_peft(model, pm, ad, "head", d)
        lm.lorakern_bank.remove("head")
        lm.lorakern_bank.add("head2", d)  # at run time too: checked against the model
    with pytest.raises(ValueError, match="base weights"):
        compress_adapter(ad)
    layers = compress_adapter(ad, group_size=32, model=model)
    assert "lm_head" in layers
    # an adapter whose copy differs would replace the base weight: refused everywhere
    other = tiny_llama(seed=3)
    with pytest.raises(ValueError, match="replaces the base weight"):
        with apply_adapter(other, ad):
            pass
    with pytest.raises(ValueError, match="replaces the base weight"):
        lorakern.attach_adapters(other, {"head": d})
    with pytest.raises(ValueError, match="replaces the base weight"):
        compress_adapter(ad, model=other)
    assert type(other.lm_head) is torch.nn.Linear  # nothing changed


def test_embedding_lora_is_refused_by_name(tmp_path):
    d, _ = peft_save(tiny_llama(), tmp_path, "emb", r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(FormatError, match="embedding layer"):
        load_peft_adapter(d)
    with pytest.raises(FormatError, match="embedding layer"):
        lorakern.attach_adapters(tiny_llama(), {"e": d})


# --- saving mixed ranks and scales ------------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_save_mixed_ranks_and_scales_roundtrip_through_peft(tmp_path, rslora):
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    spec = {"model.layers.0.self_attn.q_proj": (8, 2.0), "model.layers.0.self_attn.v_proj": (4, 0.5),
            "model.layers.1.self_attn.q_proj": (8, 2.0), "model.layers.1.mlp.down_proj": (3, 1.25)}
    layers = {}
    for m, (r, sc) in spec.items():
        N, K = model.get_submodule(m).weight.shape
        layers[m] = LoraLayer(torch.randn(r, K, generator=g) * 0.1, torch.randn(N, r, generator=g) * 0.1, sc)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_rslora": rslora,
           "alpha_pattern": {"q_proj": 99}}  # stale: must not survive
    ad = LoraAdapter(cfg, layers, metadata={"lorakern_task": "demo"})
    save_peft_adapter(ad, tmp_path / "mixed")
    written = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert not any(k.startswith("lorakern") for k in written)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "mixed").eval()
    got = peft_scales(pm)
    for m, (r, sc) in spec.items():
        assert got[m][0] == r and math.isclose(got[m][1], sc, rel_tol=1e-12), (m, got[m])
    back = load_peft_adapter(tmp_path / "mixed")
    assert back.metadata == {"lorakern_task": "demo"}
    with torch.no_grad(), apply_adapter(model, back):
        assert (model(IDS).logits - pm(IDS).logits).abs().max() < 1e-5


def test_saved_config_makes_peft_load_silently(tmp_path, recwarn):
    model = tiny_llama()
    d, _ = peft_save(model, tmp_path, "p", r=4, lora_alpha=8, target_modules=["q_proj"])
    ad = load_peft_adapter(d)
    ad.metadata["lorakern_task"] = "x"
    save_peft_adapter(ad, tmp_path / "ours")
    peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")
    assert not [w for w in recwarn if "lorakern" in str(w.message)]


# --- adapter_names ---------------------------------------------------------------------------------------

@pytest.fixture
def two_adapters(tmp_path):
    model = tiny_llama()
    a, _ = peft_save(model, tmp_path, "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b, _ = peft_save(tiny_llama(seed=1), tmp_path, "b", r=2, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    return model, {"a": a, "b": b}


def test_adapter_names_one_per_sample_like_peft(two_adapters):
    model, paths = two_adapters
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), paths["a"], adapter_name="a")
    pm.load_adapter(paths["b"], adapter_name="b")
    pm.eval()
    lm = copy.deepcopy(model)
    lorakern.attach_adapters(lm, paths, dtype=torch.float32)
    ids = IDS[:1, :2]  # B = 1 sample of S = 2 tokens
    with torch.no_grad():
        with pytest.raises(ValueError, match="number of inputs"):
            pm(input_ids=ids, adapter_names=["a", "b"])
        with pytest.raises(ValueError, match="number of inputs"):
            lm(input_ids=ids, adapter_names=["a", "b"])
        with pytest.raises(ValueError, match="number of inputs"):
            lm.generate(ids, adapter_names=["a", "b"], max_new_tokens=2)
        with pytest.raises(TypeError, match="list"):
            lm(input_ids=ids, adapter_names="a")
        assert (lm(input_ids=ids, adapter_names=["b"]).logits
                - pm(input_ids=ids, adapter_names=["b"]).logits).abs().max() < 1e-5
        # per token stays possible through the context
        with lm.lorakern_context.use(["a", "b"]):
            per_token = lm(input_ids=ids).logits
        assert (per_token[0, 0] - lm(input_ids=ids[:, :1], adapter_names=["a"]).logits[0, 0]).abs().max() < 1e-5


# --- GPT-2 (Conv1D) ---------------------------------------------------------------------------------------

def test_gpt2_conv1d_adapters_match_peft(tmp_path):
    model = tiny_gpt2()
    d, pm = peft_save(model, tmp_path, "g", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                      fan_in_fan_out=True)
    ad = load_peft_adapter(d)
    with torch.no_grad():
        ref, lm = _both_paths_match_peft(model, pm, ad, "g", d)
        q = lorakern.quantize_model(copy.deepcopy(model), bits=8, group_size=32, progress=False)
        with apply_adapter(q, compress_adapter(ad, group_size=32, bits_high=8, rho=1.0)):
            assert (q(IDS).logits - ref).abs().max() < 0.05
