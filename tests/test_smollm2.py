"""Model-sized checks on the real SmolLM2-135M (slow: run with `pytest -m slow`)."""
import copy

import pytest
import torch

import lorakern

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_windows():
    from lorakern.eval import read_wikitext, token_windows
    from lorakern.models import load_smollm2
    model, tok = load_smollm2()
    return model, token_windows(tok, read_wikitext("test"), 512, 2)


def test_fp32_perplexity_matches_reference(model_and_windows):
    from lorakern.eval import perplexity
    model, win = model_and_windows
    ppl = perplexity(model, win, progress=False)
    assert 15 < ppl < 40  # machine.md: ~25.5 on the first 2048 tokens


def test_4bit_model_close_to_reference_path(model_and_windows, tmp_path):
    from lorakern.eval import perplexity
    from lorakern.nn import QuantLinear
    from lorakern.ops import reference as ref
    model, win = model_and_windows
    qm = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=128, progress=False)
    ppl_kernel = perplexity(qm, win, progress=False)
    # the same quantized model through the plain-torch reference (fp32 activations)
    layer = qm.model.layers[3].mlp.down_proj
    x = torch.randn(5, layer.in_features)
    w = layer.quantized_weight
    assert (layer(x) - ref.quant_matmul_int8_act(x, w.qweight, w.scales, w.zeros, 4, w.group_size).float()).abs().max() < 1e-3
    fp = perplexity(model, win, progress=False)
    assert ppl_kernel < 1.6 * fp
    layer.save(tmp_path / "l.safetensors")
    assert torch.equal(QuantLinear.load(tmp_path / "l.safetensors")(x), layer(x))
