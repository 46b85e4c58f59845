"""QA-LoRA end to end on tiny models: QALoRALinear, the merge into fp16 zeros and its stated bound, PEFT's
use_qalora adapters both ways, training on a quantized base, the merge-qalora command."""
import copy
import json

import peft
import pytest
import torch
from peft.tuners.lora.gptq import GPTQLoraLinear

from lorakern.adapters import attach_adapter, detach_adapter, load_peft_adapter, save_peft_adapter
from lorakern.adapters.qalora import merge_qalora_adapter
from lorakern.cli import main as cli
from lorakern.formats.io import FormatError
from lorakern.formats.lora import LoraAdapter, LoraLayer
from lorakern.models import QuantConfig, quantize_model
from lorakern.models.checkpoint import load_quantized_model, save_quantized_model
from lorakern.nn import GWQLinear, QALoRALinear, QuantLinear
from lorakern.ops import reference as ref
from lorakern.quant.qalora import merge_error_bound, merged_zeros
from lorakern.testing import random_outliers, random_qweight, tiny_llama
from lorakern.formats.outliers import GWQWeight

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _layer(rng, N=67, G=32, ng=4, r=6, bits=3):
    w = random_qweight(N, ng * G, bits, G, rng)
    A = torch.randn(r, ng, generator=rng)
    B = torch.randn(N, r, generator=rng) * 0.05
    return QuantLinear(w, torch.randn(N, generator=rng)), A, B


def test_unmerged_forward_is_the_definition(rng):
    base, A, B = _layer(rng)
    m = QALoRALinear(base, A, B, 2.0)
    m.fused = False
    x = torch.randn(2, 5, 128, generator=rng)
    expect = base(x).double() + 2.0 * (ref.qalora_pool(x, 32).double() @ A.double().t()) @ B.double().t()
    assert torch.allclose(m(x).double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_merge_bound_holds_and_is_tight(bits, rng):
    """merged - unmerged on the reference (exact weights, exact pooling) stays within the stated bound."""
    base, A, B = _layer(rng, bits=bits)
    m = QALoRALinear(base, A, B, 1.5)
    merged = m.merged()
    x = torch.randn(9, 128, generator=rng)
    unmerged = ref.quant_matmul(x, base.qweight, base.scales, base.zeros, bits, 32, base.bias).double() \
        + 1.5 * (ref.qalora_pool(x, 32).double() @ A.double().t()) @ B.double().t()
    got = ref.quant_matmul(x, merged.qweight, merged.scales, merged.zeros, bits, 32, merged.bias).double()
    exact = merged_zeros(base.scales, base.zeros, A, B, 1.5, 32)
    bound = merge_error_bound(base.scales, exact, merged.zeros, x, 32)
    err = (got - unmerged).abs()
    assert (err <= bound + 1e-4 * (unmerged.abs() * 1e-3 + 1)).all()  # + fp32 rounding of the reference
    # the codes and scales are untouched; only zeros moved, and the bound is the fp16 rounding of z'
    assert torch.equal(merged.qweight, base.qweight) and torch.equal(merged.scales, base.scales)
    assert not torch.equal(merged.zeros, base.zeros)
    assert ((merged.zeros.double() - exact).abs() <= 2.0 ** -11 * exact.abs() + 2.0 ** -25).all()


def test_merged_kernel_equals_fused_unmerged_kernel(isa, rng):
    """On CPU the fused unmerged op pools the same int8 activations as the merged base kernel: they agree to
    the merge bound (computed on those activations) plus fp32 rounding."""
    from lorakern.testing import quantize_activations_int8
    base, A, B = _layer(rng, bits=4)
    m = QALoRALinear(base, A, B, 1.5)
    merged = m.merged()
    x = torch.randn(7, 128, generator=rng)
    with torch.no_grad():
        y_unmerged, y_merged = m(x), merged(x)
    xhat = quantize_activations_int8(x, 32)
    bound = merge_error_bound(base.scales, merged_zeros(base.scales, base.zeros, A, B, 1.5, 32), merged.zeros, xhat, 32)
    assert ((y_unmerged.double() - y_merged.double()).abs() <= bound + 1e-4).all()


def test_fused_forward_follows_in_place_changes_of_B(rng):
    base, A, B = _layer(rng)
    m = QALoRALinear(base, A, B, 1.0)
    x = torch.randn(3, 128, generator=rng)
    with torch.no_grad():
        before = m(x)
        m.load_state_dict({**m.state_dict(), "lora_B": torch.zeros_like(B)})
        assert torch.equal(m(x), base(x)) and not torch.equal(before, base(x))
        m.lora_B.copy_(B)
        assert torch.equal(m(x), before)


def test_merge_into_gwq_keeps_outliers(rng):
    w = random_qweight(40, 64, 4, 32, rng)
    o = random_outliers(40, 64, "5pct", rng)
    base = GWQLinear(GWQWeight(w, o))
    A, B = torch.randn(3, 2, generator=rng), torch.randn(40, 3, generator=rng) * 0.1
    m = QALoRALinear(base, A, B, 1.0)
    merged = m.merged()
    assert isinstance(merged, GWQLinear) and torch.equal(merged.values, base.values)
    x = torch.randn(4, 64, generator=rng)
    with torch.no_grad():
        assert torch.allclose(merged(x), m(x), rtol=1e-3, atol=2e-2)


def test_merge_refusals(rng):
    base, A, B = _layer(rng)
    with pytest.raises(ValueError, match="beyond fp16's range"):
        QALoRALinear(base, A * 1e6, B, 1.0).merged()
    s = base.scales.clone()
    s[3, 1] = 0
    base0 = QuantLinear(type(base.quantized_weight)(base.qweight, s, base.zeros, 3, 32))
    with pytest.raises(ValueError, match="scale 0"):
        QALoRALinear(base0, A, B, 1.0).merged()
    with pytest.raises(ValueError, match="groups of 64"):
        QALoRALinear(base, torch.randn(6, 2), B, 1.0, group_size=64).merged()
    with pytest.raises(TypeError, match="quantized layer"):
        QALoRALinear(torch.nn.Linear(128, 67), A, B, 1.0, group_size=32).merged()
    with pytest.raises(ValueError, match="do not fit"):
        QALoRALinear(base, A[:, :3], B, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        QALoRALinear(base, A * float("nan"), B, 1.0)


@pytest.fixture(scope="module")
def qmodel():
    model = tiny_llama()  # hidden 64, intermediate 96: groups of 32 divide every projection
    quantize_model(model, QuantConfig(method="rtn", bits=4, group_size=32), progress=False)
    return model


IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 12, 1, 30]])


def _train_on_ids(model, cfg):
    """Train ``cfg``'s adapter on next-token prediction of IDS; returns (adapter, the loss at every step)."""
    from lorakern.apps.train.trainer import _train
    losses = []

    def loss_fn(step):
        logits = model(input_ids=IDS[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits[0], IDS[0, 1:])
        losses.append(float(loss.detach()))
        return loss
    return _train(model, cfg, loss_fn, "tiny", False, {}), losses


def _peft_qalora(model, tmp_path, seed=0):
    """A PEFT use_qalora adapter on lorakern's QuantLinear layers (PEFT's GPTQ LoRA layer, registered for
    QuantLinear as a custom module), randomised, saved; returns (directory, peft model)."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_qalora=True, qalora_group_size=32)
    cfg._register_custom_module({QuantLinear: GPTQLoraLinear})
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    d = tmp_path / f"peft{seed}"
    pm.save_pretrained(d)
    return d, pm


def test_peft_qalora_adapter_loads_into_lorakern(qmodel, tmp_path):
    d, pm = _peft_qalora(qmodel, tmp_path)
    adapter = load_peft_adapter(d)
    assert adapter.config["use_qalora"] and adapter.layers["model.layers.0.self_attn.q_proj"].A.shape == (4, 2)
    with torch.no_grad():
        want = pm(IDS).logits
        base = qmodel(IDS).logits
        old = attach_adapter(qmodel, adapter)
        for mod in old:
            qmodel.get_submodule(mod).fused = False  # exact pooling, as PEFT computes it
        exact = qmodel(IDS).logits
        for mod in old:
            qmodel.get_submodule(mod).fused = True
        fused = qmodel(IDS).logits
        detach_adapter(qmodel, old)
    assert (want - base).abs().max() > 0.1  # the adapter matters
    assert torch.allclose(exact, want, rtol=1e-4, atol=1e-4)
    assert (fused - want).abs().max() < 0.05 * (want - base).abs().max()  # int8-pooled: close, not exact


def test_lorakern_qalora_adapter_loads_into_peft(qmodel, tmp_path):
    g = torch.Generator().manual_seed(3)
    layers = {}
    for n, m in qmodel.named_modules():
        if isinstance(m, QuantLinear) and n.split(".")[-1] in TARGETS:
            layers[n] = LoraLayer(torch.randn(4, m.in_features // 32, generator=g),
                                  torch.randn(m.out_features, 4, generator=g) * 0.3, 2.0)
    adapter = LoraAdapter({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                           "use_qalora": True, "qalora_group_size": 32}, layers)
    d = save_peft_adapter(adapter, tmp_path / "ours")
    cfg = peft.LoraConfig.from_pretrained(d)
    cfg._register_custom_module({QuantLinear: GPTQLoraLinear})
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(qmodel), d, config=cfg)
    with torch.no_grad():
        want = pm(IDS).logits
        old = attach_adapter(qmodel, adapter)
        for mod in old:
            qmodel.get_submodule(mod).fused = False
        got = qmodel(IDS).logits
        detach_adapter(qmodel, old)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    again = load_peft_adapter(d)  # and back: the same A
    name = next(iter(layers))
    assert torch.allclose(again.layers[name].A, layers[name].A, rtol=1e-6)


def test_bad_qalora_configs_and_places(qmodel, tmp_path):
    d, _ = _peft_qalora(qmodel, tmp_path, seed=1)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["qalora_group_size"] = 0
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="qalora_group_size"):
        load_peft_adapter(d)
    cfg["qalora_group_size"] = 32
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    adapter = load_peft_adapter(d)
    from lorakern import attach_adapters
    from lorakern.adapters import compress_adapter
    with pytest.raises(ValueError, match="QA-LoRA"):
        attach_adapters(qmodel, {"a": adapter})
    with pytest.raises(ValueError, match="QA-LoRA"):
        compress_adapter(adapter)


def test_train_qalora_on_quantized_base_then_merge(qmodel, tmp_path):
    """Training lowers the loss through the quantized ops; the merged model equals the unmerged one within the
    merge bound; merge-qalora writes a plain quantized directory that reloads to the same logits."""
    from lorakern.apps.train.trainer import TrainConfig
    model = copy.deepcopy(qmodel)
    adapter, losses = _train_on_ids(model, TrainConfig(rank=4, alpha=8, steps=30, lr=3e-2, qalora=True, warmup=1))
    assert losses[-1] < 0.9 * losses[0]
    # B starts at zero: the first layer's moved only if gradients flowed back through the quantized layers above
    assert adapter.layers["model.layers.0.mlp.up_proj"].B.abs().max() > 0
    assert adapter.config["use_qalora"] and adapter.config["qalora_group_size"] == 32
    with torch.no_grad():
        base = model(IDS).logits
        old = attach_adapter(model, adapter)
        unmerged = model(IDS).logits
        detach_adapter(model, old)
        base_dir, ad_dir, out_dir = tmp_path / "base", tmp_path / "ad", tmp_path / "merged"
        save_quantized_model(model, base_dir)
        save_peft_adapter(adapter, ad_dir)
        assert cli(["merge-qalora", str(base_dir), str(ad_dir), str(out_dir)]) == 0
        merged_model = load_quantized_model(out_dir)
        merged = merged_model(IDS).logits
        in_place = copy.deepcopy(model)
        merge_qalora_adapter(in_place, adapter)
        assert torch.equal(in_place(IDS).logits, merged)
    assert not any(isinstance(m, QALoRALinear) for m in merged_model.modules())
    # layer by layer the difference is the fp16 rounding of the merged zeros (test_merge_bound_holds_and_is_tight);
    # through the model it stays a small fraction of what the adapter changes
    assert (merged - unmerged).abs().max() < 0.05 * (unmerged - base).abs().max()


def test_qlora_style_lora_on_quantized_base(qmodel):
    from lorakern.apps.train.trainer import TrainConfig
    model = copy.deepcopy(qmodel)
    adapter, losses = _train_on_ids(model, TrainConfig(rank=4, alpha=8, steps=30, lr=3e-2, warmup=1))
    assert losses[-1] < 0.9 * losses[0]
    assert "use_qalora" not in adapter.config and len(adapter.layers) == 7 * 2


def test_merge_qalora_cli_errors(qmodel, tmp_path):
    save_quantized_model(qmodel, tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    plain = LoraAdapter({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]},
                        {"model.layers.0.self_attn.q_proj": LoraLayer(torch.randn(2, 64, generator=g),
                                                                      torch.randn(64, 2, generator=g), 1.0)})
    save_peft_adapter(plain, tmp_path / "plain")
    assert cli(["merge-qalora", str(tmp_path / "base"), str(tmp_path / "plain"), str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("method", ["rtn", "gptq", "gwq"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qalora_trains_and_merges_on_every_base(method, bits):
    """QA-LoRA on RTN, GPTQ and GWQ (outliers: gradients through gwq_matmul) bases at 2, 3 and 4 bits."""
    from lorakern.apps.train.trainer import TrainConfig
    model = tiny_llama()
    cal = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    quantize_model(model, QuantConfig(method=method, bits=bits, group_size=32), calibration=cal, progress=False)
    adapter, losses = _train_on_ids(model, TrainConfig(rank=4, alpha=8, steps=15, lr=3e-2, qalora=True, warmup=1))
    assert losses[-1] < losses[0] - 0.1
    with torch.no_grad():
        base = model(IDS).logits
        old = attach_adapter(model, adapter)
        unmerged = model(IDS).logits
        detach_adapter(model, old)
        merge_qalora_adapter(model, adapter)
        merged = model(IDS).logits
    assert (merged - unmerged).abs().max() < 0.05 * (unmerged - base).abs().max()
