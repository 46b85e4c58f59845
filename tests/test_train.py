"""The adapter suite's tasks and trainer: generated examples are right, a tiny adapter
trains (loss falls), PEFT loads what the trainer saves and agrees with lorakern, and
the model is left unchanged. The SmolLM2 smoke test is behind the slow marker."""
import random

import pytest
import torch

from lorakern.adapters import apply_adapter, load_peft_adapter, save_peft_adapter
from lorakern.apps.train import SUITE, TrainConfig, exact_match, get_task, train_task_adapter
from lorakern.apps.train.trainer import _encode_pairs, answer_loss
from lorakern.testing import char_tokenizer

peft = pytest.importorskip("peft")


def tiny_llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_generated_answers_are_right():
    for name, task in SUITE.items():
        ex = task.examples(50, seed=3)
        assert ex == task.examples(50, seed=3) and ex != task.examples(50, seed=4)
        for x, y in ex:
            if name == "add":
                a, b = x.split(" + ")
                assert int(y) == int(a) + int(b)
            elif name == "reverse":
                assert y.split() == x.split()[::-1]
            elif name == "sort":
                assert y.split() == sorted(x.split())
            elif name == "count":
                letter, word = x.split(" in ")
                assert int(y) == word.split().count(letter)
            elif name == "caesar3":
                assert [chr((ord(c) - 97 + 3) % 26 + 97) for c in x.split()] == y.split()
    assert get_task("caesar7").make(random.Random(0))[1] != get_task("caesar3").make(random.Random(0))[1]
    assert get_task("base2").make(random.Random(1)) == (lambda x: (x[0], " ".join(bin(int(x[0]))[2:])))(
        get_task("base2").make(random.Random(1)))
    assert get_task("addc17").make(random.Random(2))[1] == str(int(get_task("addc17").make(random.Random(2))[0]) + 17)
    for bad in ("nope", "caesar0", "base12"):
        with pytest.raises(ValueError):
            get_task(bad)


def test_hard_suite_answers_are_right():
    from lorakern.apps.train import HARD_SUITE
    for name, task in HARD_SUITE.items():
        ex = task.examples(200, seed=5)
        assert ex == task.examples(200, seed=5) and get_task(name) is task
        for x, y in ex:
            if name in ("add4", "mul"):
                a, b = map(int, x.replace("*", "+").split(" + "))
                assert int(y) == (a + b if name == "add4" else a * b)
                assert (1000 <= a <= 9999 and 1000 <= b <= 9999) if name == "add4" else (12 <= a <= 99 and 3 <= b <= 9)
            elif name == "add":
                a, b = map(int, x.split(" + "))
                assert int(y) == a + b
            elif name == "caesar_pos":
                want = [chr((ord(c) - 97 + i + 1) % 26 + 97) for i, c in enumerate(x.split())]
                assert y.split() == want
            elif name == "count":
                letter, word = x.split(" in ")
                assert int(y) == word.split().count(letter)
            else:
                raise AssertionError(f"untested task {name}")
    assert "z" in {y.split()[0] for x, y in HARD_SUITE["caesar_pos"].examples(300, 1) if x.split()[0] == "y"}


def test_tiny_adapter_trains_and_peft_loads_it(tmp_path):
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    task = get_task("sort")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = _encode_pairs(tok, task, task.examples(32, seed=99))
    with torch.no_grad():
        loss0 = float(answer_loss(model, *probe))
    cfg = TrainConfig(rank=4, alpha=8, steps=40, batch_size=16, lr=1e-2, seed=1)
    adapter = train_task_adapter(model, tok, task, cfg, progress=False)
    # the base model is untouched, every projection got an adapter
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad
    assert len(adapter.layers) == 2 * 7
    with apply_adapter(model, adapter), torch.no_grad():
        loss1 = float(answer_loss(model, *probe))
        em = exact_match(model, tok, task, n=20, batch_size=8)
    assert loss1 < 0.9 * loss0, (loss0, loss1)  # measured: 4.55 -> 3.85 (LoRA alone on a random 2-layer model)
    assert 0.0 <= em <= 1.0
    # PEFT loads the saved adapter and computes the same logits as lorakern
    save_peft_adapter(adapter, tmp_path / "ad")
    ids = probe[0][:4]
    with apply_adapter(model, load_peft_adapter(tmp_path / "ad")), torch.no_grad():
        ours = model(ids).logits
    pm = peft.PeftModel.from_pretrained(tiny_llama(len(tok)), tmp_path / "ad").eval()
    with torch.no_grad():
        theirs = pm(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = model(ids).logits
    assert (plain - ours).abs().max() > 1e-3  # the adapter changed something, and detaching restored the model


def test_train_config_is_checked():
    for bad in (dict(rank=0), dict(steps=0), dict(lr=0.0), dict(alpha=-1.0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


@pytest.mark.slow
def test_smollm2_tiny_adapter_smoke(tmp_path):
    """The real model: a few steps of a rank-4 adapter, saved and loaded by PEFT."""
    from lorakern.models.smollm2 import load_smollm2
    model, tok = load_smollm2()
    cfg = TrainConfig(rank=4, alpha=8, steps=3, batch_size=4, lr=1e-3)
    adapter = train_task_adapter(model, tok, get_task("date"), cfg, progress=False)
    save_peft_adapter(adapter, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "ad")
    assert len(load_peft_adapter(tmp_path / "ad").layers) == 30 * 7
    ids = tok("Rewrite the date.\nInput: May 3, 2001\nOutput:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(pm(ids).logits).all()
