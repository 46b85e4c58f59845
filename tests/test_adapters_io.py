"""PEFT-format adapters in and out (checked against peft itself), compressed adapter files, the CLI."""
import json

import pytest
import torch

from lorakern.adapters import (compress_adapter, load_compressed_adapter, load_peft_adapter, save_compressed_adapter,
                               save_peft_adapter)
from lorakern.formats import FormatError

peft = pytest.importorskip("peft")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def peft_dir(tmp_path):
    """A PEFT adapter saved by peft itself, with non-zero B (as after training)."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj",
                                                                                                    "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        logits = model(ids).logits
    return tmp_path / "peft", ids, logits


def test_peft_roundtrip_through_lorakern(peft_dir, tmp_path):
    src, ids, logits = peft_dir
    ad = load_peft_adapter(src)
    assert len(ad.layers) == 2 * 3
    layer = ad.layers["model.layers.0.self_attn.q_proj"]
    assert layer.rank == 8 and layer.scale == 2.0 and layer.A.shape == (8, 128) and layer.B.shape == (128, 8)
    save_peft_adapter(ad, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_bad_adapters_are_rejected(peft_dir, tmp_path):
    src, _, _ = peft_dir
    from safetensors.torch import load_file, save_file
    tensors = load_file(src / "adapter_model.safetensors")
    cfg = json.loads((src / "adapter_config.json").read_text())

    def write(name, t, c=cfg):
        d = tmp_path / name
        d.mkdir()
        save_file(t, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(c))
        return d
    key_a = next(k for k in tensors if "lora_A" in k)
    missing = dict(tensors)
    del missing[key_a]
    with pytest.raises(FormatError, match="not both"):
        load_peft_adapter(write("missing", missing))
    wrong = dict(tensors)
    wrong[key_a] = torch.randn(5, wrong[key_a].shape[1])
    with pytest.raises(FormatError, match="ranks differ"):
        load_peft_adapter(write("wrong", wrong))
    nan = dict(tensors)
    nan[key_a] = nan[key_a].clone()
    nan[key_a][0, 0] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        load_peft_adapter(write("nan", nan))
    with pytest.raises(FormatError, match="r=4"):
        load_peft_adapter(write("rank", tensors, {**cfg, "r": 4}))
    with pytest.raises(FormatError, match="unsupported tensor"):
        load_peft_adapter(write("extra", {**tensors, "base_model.model.lm_head.scales": torch.randn(3, 3)}))
    # a full weight beside the adapter is a base-weight copy: kept, and checked against the model on attach
    copy_ = load_peft_adapter(write("copy", {**tensors, "base_model.model.lm_head.weight": torch.randn(3, 3)}))
    assert list(copy_.base_weights) == ["lm_head"]
    from lorakern.adapters import apply_adapter
    with pytest.raises(ValueError, match="replaces the base weight"):
        with apply_adapter(tiny_llama(), copy_):
            pass
    with pytest.raises(FormatError, match="no adapter_config"):
        load_peft_adapter(tmp_path)
    d = write("trunc", tensors)
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[:100])
    with pytest.raises(FormatError):
        load_peft_adapter(d)


def test_compressed_adapter_file_and_cli(peft_dir, tmp_path, capsys):
    src, _, _ = peft_dir
    ad = load_peft_adapter(src)
    layers = compress_adapter(ad, rho=0.9, bits_high=3)
    save_compressed_adapter(tmp_path / "c.safetensors", layers)
    back = load_compressed_adapter(tmp_path / "c.safetensors")
    assert set(back) == set(layers)
    for m, c in layers.items():
        assert back[m].h == c.h and back[m].scale == c.scale
        assert torch.equal(back[m].delta(), c.delta())
    from lorakern.cli import main
    assert main(["compress-adapter", str(src), str(tmp_path / "cli.safetensors"), "--rho", "0.8"]) == 0
    assert "bits per parameter" in capsys.readouterr().out
    assert set(load_compressed_adapter(tmp_path / "cli.safetensors")) == set(layers)
    # --paper-scales: LoRAQuant's own scales, i.e. compress_adapter(unbias=False); the default is unbiased
    assert main(["compress-adapter", str(src), str(tmp_path / "p.safetensors"), "--rho", "0.8", "--paper-scales"]) == 0
    paper = load_compressed_adapter(tmp_path / "p.safetensors")
    ours = load_compressed_adapter(tmp_path / "cli.safetensors")
    want = compress_adapter(ad, rho=0.8, unbias=False)
    for m, c in want.items():
        assert torch.equal(paper[m].delta(), c.delta())
        assert not torch.equal(ours[m].delta(), c.delta())


def test_attach_adapter_checks_everything_first(peft_dir):
    """A misfitting adapter is refused before any module is swapped; apply_adapter restores the model."""
    from lorakern.adapters import LoraLayer, apply_adapter, attach_adapter
    from lorakern.nn import LoRALinear
    src, ids, logits = peft_dir
    ad = load_peft_adapter(src)
    model = tiny_llama()
    with torch.no_grad():
        plain = model(ids).logits
    with apply_adapter(model, ad), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)
    bad = dict(ad.layers)
    bad["model.layers.9.self_attn.q_proj"] = next(iter(ad.layers.values()))
    with pytest.raises(ValueError, match="no module"):
        attach_adapter(model, bad)
    first = next(iter(ad.layers))
    wrong = dict(ad.layers)
    wrong[first] = LoraLayer(torch.randn(8, 7), torch.randn(128, 8), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        attach_adapter(model, wrong)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
