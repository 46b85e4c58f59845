"""DLP-LoRA: top-p selection, the router (training, determinism, files), routed fusion against PEFT's
weighted sums, routing once per request, dense and compressed adapters alike."""
import copy

import pytest
import torch

import lorakern
from lorakern.apps.dlp import DLPRouter, FixedMixture, attach_router, prompt_features, top_p_select, train_router
from lorakern.formats import FormatError
from lorakern.testing import save_random_peft_adapters, tiny_llama

peft = pytest.importorskip("peft")


# --- top-p selection ---------------------------------------------------------------------------------------

def test_top_p_basic_and_extremes():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.7, 0.2], [0.0, 0.0, 1.0]])
    ids, w = top_p_select(p, 0.6)
    assert ids.tolist() == [[0, 1], [1, -1], [2, -1]]
    assert torch.allclose(w, torch.tensor([[0.625, 0.375], [1.0, 0.0], [1.0, 0.0]]))
    ids, w = top_p_select(p, 0.5)  # exactly reached by the first: one kept
    assert ids[0].tolist()[:1] == [0] and (ids[0, 1:] == -1).all()
    ids, w = top_p_select(p, 0.0)  # at least one
    assert ids.shape == (3, 1) and ids[:, 0].tolist() == [0, 1, 2] and torch.equal(w, torch.ones(3, 1))
    ids, w = top_p_select(p, 1.0)  # every adapter with non-zero probability
    assert ids.tolist() == [[0, 1, 2], [1, 2, 0], [2, -1, -1]]
    assert torch.allclose(w.sum(1), torch.ones(3)) and torch.allclose(w[0], p[0])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            top_p_select(p, bad)
    with pytest.raises(ValueError):
        top_p_select(torch.tensor([[0.5, float("nan")]]))
    with pytest.raises(ValueError):
        top_p_select(torch.tensor([0.5, 0.5]))


def test_top_p_ties_keep_the_lower_index():
    p = torch.full((2, 4), 0.25)
    ids, w = top_p_select(p, 0.6)
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2]] and torch.allclose(w, torch.full((2, 3), 1 / 3))
    ids, _ = top_p_select(torch.tensor([[0.2, 0.4, 0.4]]), 0.3)
    assert ids.tolist() == [[1]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_p_against_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(7, 5, generator=g) * 2, -1)
    for top_p in (0.0, 0.3, 0.6, 0.9, 1.0):
        ids, w = top_p_select(p, top_p)
        for b in range(7):
            order = sorted(range(5), key=lambda i: (-float(p[b, i]), i))
            kept, mass = [], 0.0
            for i in order:
                if kept and (mass >= top_p - 1e-12 if top_p < 1 else p[b, i] <= 0):
                    break
                kept.append(i)
                mass += float(p[b, i])
            got = [i for i in ids[b].tolist() if i >= 0]
            assert got == kept
            want = p[b, kept] / p[b, kept].sum()
            assert torch.allclose(w[b, :len(kept)], want.float(), atol=1e-6)


# --- a tiny model, three adapters -------------------------------------------------------------------------

class CharTokenizer:
    """Characters as tokens (3..127), pad 0: enough for prompt batches."""
    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, **_):
        class Enc:
            input_ids = [3 + (ord(c) % 125) for c in text]
        return Enc()


TASKS = {"alpha": "Spell the word: {}", "digits": "Add these: {}", "upper": "SHOUT {} NOW"}


def task_prompts(name, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        word = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(torch.randint(3, 9, (1,), generator=g)),),
                                                                generator=g))
        out.append(TASKS[name].format(word if name != "digits" else str(int(torch.randint(0, 10**6, (1,), generator=g)))))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dlp")
    model = tiny_llama()
    paths = save_random_peft_adapters(model, tmp, {"alpha": ["q_proj", "v_proj"], "digits": ["k_proj", "down_proj"],
                                                   "upper": ["q_proj", "up_proj"]}, 0.2, rank=lambda i: 4 + i)
    tok = CharTokenizer()
    router = train_router(model, tok, {n: task_prompts(n, 40, i) for i, n in enumerate(TASKS)}, epochs=30,
                          progress=False)
    return model, paths, tok, router, tmp


def test_router_learns_and_is_deterministic(setup):
    model, _, tok, router, _ = setup
    assert router.num_parameters() < 5_000_000 and router.record["train_accuracy"] == 1.0
    again = train_router(model, tok, {n: task_prompts(n, 40, i) for i, n in enumerate(TASKS)}, epochs=30,
                         progress=False)
    for (k, a), (_, b) in zip(router.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    from lorakern.apps.dlp import prompt_batches
    for i, name in enumerate(TASKS):
        held = task_prompts(name, 20, 100 + i)
        ids, mask = next(prompt_batches(tok, held))
        names, w = router.route(model, ids, mask)
        assert all(row[0] == name for row in names)
        assert torch.equal(router.route(model, ids, mask)[1], w)  # the same prompts, the same routing


def test_prompt_features_ignore_padding(setup):
    model, _, tok, _, _ = setup
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    f = prompt_features(model, ids, mask)
    alone = prompt_features(model, ids[:1, 2:])
    assert torch.allclose(f[0], alone[0], atol=1e-6)
    with pytest.raises(ValueError, match="no token"):
        prompt_features(model, ids, torch.zeros_like(ids))


def peft_weighted(model, paths, names, weights):
    """PEFT's weighted sum of adapters (combination 'cat' = sum_i w_i s_i B_i A_i) as a PEFT model."""
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), paths[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(paths[n], adapter_name=n)
    pm.add_weighted_adapter(names, weights, "mix", combination_type="cat")
    pm.set_adapter("mix")
    return pm.eval()


@pytest.mark.parametrize("compressed", [False, True])
def test_routed_fusion_matches_peft_weighted_sums(setup, compressed, tmp_path):
    model, paths, tok, router, tmp = setup
    lm = copy.deepcopy(model)
    adapters = dict(paths)
    if compressed:  # LoRAQuant-compressed at 8 bits with every component high: close to the dense adapters
        from lorakern.adapters import compress_adapter, load_peft_adapter, save_compressed_adapter
        for n, p in paths.items():
            f = tmp_path / f"{n}.safetensors"
            save_compressed_adapter(f, compress_adapter(load_peft_adapter(p), rho=1.0, bits_high=8, group_size=32))
            adapters[n] = f
    lorakern.attach_adapters(lm, adapters, dtype=torch.float32)
    # a fixed distribution per prompt, so that the mixtures are known: sample 0 -> two adapters, sample 1 -> one
    mixes = [(["alpha", "upper"], [0.7, 0.3]), (["digits"], [1.0])]

    class Known:
        names = list(TASKS)
        calls = 0

        def route(self, model, input_ids, attention_mask=None):
            Known.calls += 1
            names = [m[0] + [None] * (2 - len(m[0])) for m in mixes]
            return names, torch.tensor([m[1] + [0.0] * (2 - len(m[1])) for m in mixes])
    attach_router(lm, Known())
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = lm(input_ids=ids, adapter_names="auto").logits
        for b, (names, w) in enumerate(mixes):
            ref = peft_weighted(model, paths, names, w)(input_ids=ids[b:b + 1]).logits[0]
            tol = 2e-2 if compressed else 1e-5
            assert (out[b] - ref).abs().max() <= tol * ref.abs().max(), (b, (out[b] - ref).abs().max())
        Known.calls = 0
        gen = lm.generate(ids, adapter_names="auto", max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert Known.calls == 1  # routed once per request, not per token
        with lm.lorakern_context.use([[lm.lorakern_bank.id("alpha"), lm.lorakern_bank.id("upper")],
                                      [lm.lorakern_bank.id("digits"), -1]], weights=[[0.7, 0.3], [1.0, 0.0]]):
            manual = lm.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, manual)
        beams = lm.generate(ids, adapter_names="auto", max_new_tokens=3, num_beams=2, pad_token_id=0)
        assert beams.shape == (2, 9)


def test_trained_router_and_uniform_mixture_in_generate(setup):
    model, paths, tok, router, _ = setup
    lm = copy.deepcopy(model)
    with pytest.raises(ValueError, match="attach_adapters first"):
        attach_router(lm, router)
    lorakern.attach_adapters(lm, paths, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs a router"):
        lm(input_ids=torch.tensor([[5, 6]]), adapter_names="auto")
    attach_router(lm, router)
    from lorakern.apps.dlp import prompt_batches
    prompts = task_prompts("alpha", 2, 7) + task_prompts("digits", 2, 8)
    ids, mask = next(prompt_batches(tok, prompts))
    with torch.no_grad():
        routed = lm.generate(input_ids=ids, attention_mask=mask, adapter_names="auto", max_new_tokens=4,
                             do_sample=False, pad_token_id=0)
        oracle = lm.generate(input_ids=ids, attention_mask=mask, adapter_names=["alpha"] * 2 + ["digits"] * 2,
                             max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(routed, oracle)  # a confident router keeps one adapter: the oracle's
        attach_router(lm, FixedMixture(list(TASKS)))
        uni = lm(input_ids=ids[:1], attention_mask=mask[:1], adapter_names="auto").logits
        ref = peft_weighted(model, paths, list(TASKS), [1 / 3] * 3)(input_ids=ids[:1], attention_mask=mask[:1]).logits
        assert (uni - ref).abs().max() <= 1e-5 * ref.abs().max()
    other = DLPRouter(["alpha", "nope"], 64)
    with pytest.raises(ValueError, match="lacks"):
        attach_router(lm, other)
    with pytest.raises(ValueError, match="features"):
        attach_router(lm, DLPRouter(["alpha", "digits"], 32))
    lorakern.detach_adapters(lm)
    assert not hasattr(lm, "lorakern_router")


def test_router_files(setup, tmp_path):
    model, _, tok, router, _ = setup
    p = router.save(tmp_path / "r.safetensors")
    back = DLPRouter.load(p)
    x = torch.randn(3, 64)
    assert torch.equal(back.probs(x), router.probs(x)) and back.names == router.names and back.top_p == router.top_p
    from safetensors.torch import load_file, save_file
    data = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        DLPRouter.load(tmp_path / "trunc.safetensors")
    t = load_file(str(p))
    meta = {"format": "lorakern.dlp_router", "config": '{"names": ["a", "b", "c"], "in_dim": 64, "hidden": 256, '
                                                       '"top_p": 0.6}'}
    for name, tensors, m in [
        ("nan", {**t, "net.1.weight": t["net.1.weight"] * float("nan")}, None),
        ("shape", {**t, "net.3.bias": torch.zeros(5)}, None),
        ("missing", {k: v for k, v in t.items() if k != "net.0.weight"}, None),
        ("foreign", t, {"format": "something"}),
        ("badcfg", t, {**meta, "config": '{"names": []}'}),
        ("notjson", t, {**meta, "config": "{"}),
    ]:
        f = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(f), metadata=m or meta)
        with pytest.raises(FormatError):
            DLPRouter.load(f)
