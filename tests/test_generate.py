"""ICM-LoRA adapter generation: exact flattening, examples files, task vectors, the CVAE, generator files,
generated adapters in PEFT and in lorakern, and the command line."""
import copy
import json
import math

import pytest
import torch

import lorakern
from lorakern.adapters import LoraAdapter, LoraLayer, load_peft_adapter, save_peft_adapter
from lorakern.formats.io import FormatError
from lorakern.apps.icm import (AdapterBasis, AdapterCVAE, AdapterGenerator, AdapterLayout, CVAEConfig,
                               ConditionProjection, GeneratorTrainConfig, Normalizer, TaskExamples, flatten_adapter,
                               load_examples, task_vector, unflatten_adapter)


def random_adapter(gen, modules=(("m.q", 7, 5), ("m.v", 3, 5), ("z.q", 7, 5)), rank=3, scale=1.5):
    ad = LoraAdapter({"peft_type": "LORA", "r": rank, "lora_alpha": rank * scale})
    for i, (name, out_f, in_f) in enumerate(modules):
        A = torch.randn(rank, in_f, generator=gen) * 10.0 ** (i - 2) + 0.3 * i  # varied magnitudes and means
        B = torch.randn(out_f, rank, generator=gen) * 1e-3
        B[0, 0] = 0.0
        A[0, 0] = -0.0
        ad.layers[name] = LoraLayer(A, B, scale)
    return ad


# -- flatten / normalize --------------------------------------------------------------------------

def test_flatten_normalize_round_trip_is_exact(rng):
    ads = [random_adapter(rng) for _ in range(5)]
    layout = AdapterLayout.of(ads[0])
    vecs = torch.stack([flatten_adapter(a, layout) for a in ads])
    assert vecs.shape == (5, layout.numel) and layout.numel == 3 * (3 * 5) + 3 * 7 + 3 * 3 + 3 * 7
    norm = Normalizer.fit(vecs, layout)
    z = norm.normalize(vecs)
    for _, off, n in layout.segments:  # each tensor position is z-scored (scale a power of two near the std)
        seg = z[:, off:off + n]
        assert abs(float(seg.mean())) < 1e-6
        assert 2 ** -0.5 - 1e-9 <= float(seg.std(unbiased=False)) <= 2 ** 0.5 + 1e-9
    back = norm.denormalize(z)
    assert torch.equal(back, vecs)  # every value exactly (-0.0 comes back as +0.0)
    nz = vecs != 0
    assert torch.equal(back[nz].view(torch.int32), vecs[nz].view(torch.int32))
    for a, v in zip(ads, back):
        b = unflatten_adapter(v, layout)
        for m, layer in a.layers.items():
            assert torch.equal(b.layers[m].A, layer.A) and torch.equal(b.layers[m].B, layer.B)
            assert b.layers[m].scale == layer.scale


def test_normalizer_survives_its_own_file_format(rng):
    ads = [random_adapter(rng) for _ in range(3)]
    layout = AdapterLayout.of(ads[0])
    vecs = torch.stack([flatten_adapter(a, layout) for a in ads])
    norm = Normalizer.fit(vecs, layout)
    again = Normalizer(AdapterLayout.from_dict(json.loads(json.dumps(layout.to_dict()))), norm.mean.clone(),
                       norm.scale.clone())
    assert torch.equal(again.denormalize(norm.normalize(vecs)), vecs)


def test_flatten_rejects_mismatched_adapters(rng):
    a = random_adapter(rng)
    layout = AdapterLayout.of(a)
    b = copy.deepcopy(a)
    del b.layers["m.v"]
    with pytest.raises(ValueError, match="missing"):
        flatten_adapter(b, layout)
    b = copy.deepcopy(a)
    b.layers["m.v"] = LoraLayer(torch.zeros(2, 5), torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="m.v"):
        flatten_adapter(b, layout)
    with pytest.raises(ValueError, match="values"):
        unflatten_adapter(torch.zeros(layout.numel + 1), layout)
    with pytest.raises(ValueError, match="power"):
        Normalizer(layout, torch.zeros(6), torch.full((6,), 3.0))
    with pytest.raises(ValueError, match="malformed"):
        AdapterLayout.from_dict({"modules": ["a"], "a_shapes": [[2, 3]], "b_shapes": [[4, 3]], "scales": [1.0]})


# -- examples files and task vectors --------------------------------------------------------------

@pytest.mark.parametrize("content, match", [
    ("not json", "valid JSON"),
    ("[1, 2]", "instruction"),
    ('{"instruction": "Do it.", "examples": {}}', "list"),
    ('{"instruction": "Do it.", "examples": []}', "1 to"),
    ('{"instruction": "", "examples": [["a", "b"]]}', "instruction"),
    ('{"instruction": "two\\nlines", "examples": [["a", "b"]]}', "instruction"),
    ('{"instruction": "Do it.", "examples": [["a"]]}', "example 0"),
    ('{"instruction": "Do it.", "examples": [["a", 3]]}', "example 0"),
    ('{"instruction": "Do it.", "examples": [{"input": "a", "output": " "}]}', "example 0"),
    ('{"instruction": "Do it.", "examples": [["a", "b"], ["x\\ny", "z"]]}', "example 1"),
])
def test_malformed_examples_files_are_rejected(tmp_path, content, match):
    p = tmp_path / "ex.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_examples(p)


def test_examples_file_limits(tmp_path):
    with pytest.raises(ValueError, match="no such"):
        load_examples(tmp_path / "missing.json")
    p = tmp_path / "big.json"
    p.write_text(json.dumps({"instruction": "x", "examples": [["a" * 1000, "b"]] * 2000}))
    with pytest.raises(ValueError, match="larger"):
        load_examples(p)
    p = tmp_path / "ok.json"
    ex = TaskExamples("Do it.", (("a b", "c"), ("d", "e f")))
    p.write_text(ex.to_json())
    assert load_examples(p) == ex
    p.write_text(json.dumps({"instruction": "Do it.", "examples": [["a b", "c"], ["d", "e f"]]}))
    assert load_examples(p) == ex


def char_tokenizer():
    """A character-level fast tokenizer (97 tokens) that transformers saves and reloads."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", "<unk>", "\n"] + [chr(i) for i in range(32, 125)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval(), char_tokenizer()


def test_task_vector_is_the_mean_last_token_state(tiny_llama):
    model, tok = tiny_llama
    ex = TaskExamples("Shift.", (("a b", "c d"), ("hello there", "x"), ("q", "r s t u")))
    v = task_vector(model, tok, ex, batch_size=2)  # padding inside a batch must not matter
    want = []
    for x, y in ex.examples:
        ids = tok(f"Shift.\nInput: {x}\nOutput: {y}", add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            want.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1])
    torch.testing.assert_close(v, torch.stack(want).mean(0), rtol=1e-5, atol=1e-5)
    assert v.shape == (64,)


# -- the CVAE and the generator -------------------------------------------------------------------

def test_cvae_shapes_and_bad_inputs():
    cfg = CVAEConfig(coef_dim=7, cond_dim=5, latent=3, hidden=16)
    m = AdapterCVAE(cfg)
    rec, mu, logvar = m(torch.randn(4, 7), torch.randn(4, 5))
    assert rec.shape == (4, 7) and mu.shape == logvar.shape == (4, 3)
    total, mse, kl = m.loss(torch.randn(4, 7), torch.randn(4, 5))
    assert torch.isclose(total, mse + cfg.beta * kl) and kl >= 0
    with pytest.raises(ValueError, match="condition"):
        m(torch.randn(4, 7), torch.randn(4, 6))
    with pytest.raises(ValueError, match="coefficients"):
        m(torch.randn(4, 6), torch.randn(4, 5))
    with pytest.raises(ValueError, match="z must be"):
        m.decode(torch.randn(4, 2), torch.randn(4, 5))
    with pytest.raises(ValueError):
        CVAEConfig(coef_dim=0, cond_dim=3)
    with pytest.raises(ValueError):
        CVAEConfig(coef_dim=3, cond_dim=3, beta=-1.0)


# -- the basis and the condition projection -------------------------------------------------------

def test_basis_reconstructs_its_span_and_stores_low_bit(rng):
    L, n = 301, 9  # L not a multiple of the 128-value groups
    x = torch.randn(n, L, generator=rng, dtype=torch.float64) * torch.linspace(0.1, 3, L, dtype=torch.float64)
    exact = AdapterBasis.fit(x, k=n - 1, bits=16)  # n centred vectors span n - 1 directions
    assert exact.k == n - 1 and exact.bits == 16
    torch.testing.assert_close(exact.decode(exact.encode(x)), x, rtol=0, atol=2e-3 * float(x.abs().max()))
    # a vector outside the training set: the reconstruction is its least-squares projection onto the span
    y = torch.randn(1, L, generator=rng, dtype=torch.float64)
    rec = exact.decode(exact.encode(y))
    resid = (y - rec)[0]
    V = exact._dense.double()
    assert float((V @ resid).abs().max()) < 1e-3 * float(resid.norm()) * float(V.norm())
    prev_err = None
    for bits in (8, 4, 3, 2):  # fewer bits: smaller and less exact
        q = AdapterBasis.fit(x, k=n - 1, bits=bits)
        err = float((q.decode(q.encode(x)) - x).norm() / x.norm())
        assert q.num_bytes() < exact.num_bytes()
        if prev_err is not None:
            assert err >= prev_err * 0.8
        prev_err = err
        back = AdapterBasis.from_tensors(q.tensors("b."), q.meta(), "b.")
        assert torch.equal(back.decode(q.encode(x)), q.decode(q.encode(x)))
    assert prev_err < 0.6
    Lp = 384  # padded to whole groups of 128; fp16 mean + codes + fp16 scale and zero per group
    assert AdapterBasis.fit(x, k=n - 1, bits=3).num_bytes() == 2 * L + (n - 1) * (Lp * 3 // 8 + 4 * Lp // 128)
    assert exact.num_bytes() == 2 * L + (n - 1) * 2 * L
    with pytest.raises(ValueError, match="k must be"):
        AdapterBasis.fit(x, k=n + 1)
    with pytest.raises(ValueError, match="bits"):
        AdapterBasis.fit(x, k=2, bits=5)
    with pytest.raises(ValueError, match="coefficients"):
        exact.decode(torch.zeros(1, n))
    t = exact.tensors()
    t["basis.dense"] = t["basis.dense"][:, :-1]
    with pytest.raises(FormatError):
        AdapterBasis.from_tensors(t, exact.meta())


def test_projection_finds_the_direction_that_separates_tasks(rng):
    """Tasks differ along one known direction; draws of one task vary much more along the others. LDA must keep
    the task direction (which PCA, following the larger draw-to-draw variance, would not) and give draws unit
    spread."""
    D, tasks, draws = 12, 6, 40
    direction = torch.zeros(D)
    direction[3] = 1.0
    noise_scale = torch.full((D,), 4.0)
    noise_scale[3] = 0.3
    data = [i * 1.5 * direction + noise_scale * torch.randn(draws, D, generator=rng) for i in range(tasks)]
    P = ConditionProjection.fit(data, dim=1, shrinkage=0.05)
    w = P.weight[:, 0] / P.std  # the direction in the original coordinates
    assert abs(float(w[3])) / float(w.norm()) > 0.95
    within = torch.cat([P(v) - P(v).mean(0) for v in data])
    assert abs(float(within.std(unbiased=False)) - 1.0) < 1e-3
    centres = torch.stack([P(v).mean(0) for v in data])[:, 0]
    assert bool((centres.diff().sign() == centres.diff()[0].sign()).all())  # tasks in order along it
    assert P.out_dim == 1 and P.in_dim == D
    assert ConditionProjection.fit(data).out_dim == tasks - 1
    with pytest.raises(ValueError, match="two tasks"):
        ConditionProjection.fit(data[:1])
    with pytest.raises(ValueError, match="V >= 2"):
        ConditionProjection.fit([data[0], data[1][:1]])
    with pytest.raises(ValueError, match="dim"):
        ConditionProjection.fit(data, dim=tasks)
    with pytest.raises(ValueError, match="shrinkage"):
        ConditionProjection.fit(data, shrinkage=0.0)
    with pytest.raises(ValueError, match="expected task vectors"):
        P(torch.randn(D + 1))


def tiny_tasks(gen, layout, n_tasks=3, ckpts=6, cond_dim=5):
    """Task i: a random adapter vector plus small per-checkpoint noise; task vectors: a random direction
    per task plus noise across draws."""
    tasks = {}
    for i in range(n_tasks):
        center = torch.randn(layout.numel, generator=gen) * 0.05
        ck = center + 0.002 * torch.randn(ckpts, layout.numel, generator=gen)
        cond = torch.randn(cond_dim, generator=gen) * 3 + 0.05 * torch.randn(4, cond_dim, generator=gen)
        tasks[f"t{i}"] = (ck, cond)
    return tasks


def small_cvae():
    return dict(latent=4, hidden=32)


def test_cvae_overfits_a_tiny_set(rng):
    layout = AdapterLayout(("a", "b"), ((3, 37), (2, 11)), ((41, 3), (13, 2)), (2.0, 1.0))
    tasks = tiny_tasks(rng, layout)
    gen, hist = AdapterGenerator.fit(tasks, layout, {"peft_type": "LORA", "r": 3, "lora_alpha": 6}, cvae=small_cvae(),
                                     train=GeneratorTrainConfig(epochs=300, batch_size=6, lr=3e-3), progress=False)
    assert hist[-1]["mse"] < 0.05 * hist[0]["mse"]
    centers = {n: ck.mean(0) for n, (ck, _) in tasks.items()}
    for name, (ck, cond) in tasks.items():
        for seed in (None, 0):
            out = flatten_adapter(gen.generate(cond.mean(0), seed=seed), layout)
            err = {m: float((out - c).norm() / c.norm()) for m, c in centers.items()}
            # near its own task: the spread between tasks is ~1.4; over 52 random draws of the tasks the error was
            # below 0.25 in 51 and 0.38 in one (0.25 failed CI-sized runs about once in 50)
            assert err[name] < 0.5, (name, seed, err)
            assert min(err, key=err.get) == name


def test_generator_file_round_trip_and_validation(rng, tmp_path):
    layout = AdapterLayout(("a",), ((2, 19),), ((23, 2),), (0.5,))
    gen, _ = AdapterGenerator.fit(tiny_tasks(rng, layout, n_tasks=2, ckpts=3), layout, {"peft_type": "LORA", "r": 2,
                                  "lora_alpha": 1}, cvae=small_cvae(), train=GeneratorTrainConfig(epochs=2),
                                  progress=False)
    p = gen.save(tmp_path / "g.safetensors")
    back = AdapterGenerator.load(p)
    c = torch.randn(5, generator=rng)
    a, b = gen.generate(c, seed=3), back.generate(c, seed=3)
    assert torch.equal(a.layers["a"].A, b.layers["a"].A) and torch.equal(a.layers["a"].B, b.layers["a"].B)
    assert back.num_bytes() == gen.num_bytes() > 0
    with pytest.raises(ValueError, match="condition has 5 values"):
        gen.generate(torch.randn(6))
    with pytest.raises(ValueError, match="NaN"):
        gen.generate(torch.full((5,), float("nan")))
    raw = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FormatError):
        AdapterGenerator.load(tmp_path / "cut.safetensors")
    from safetensors.torch import load_file, save_file
    t = load_file(p)
    t.pop("cvae.decoder.0.weight")
    meta = {"format": "lorakern.adapter_generator", "format_version": "2", "cvae_config": json.dumps(
            gen.cvae.cfg.to_dict()), "basis": json.dumps(gen.basis.meta()), "layout": json.dumps(layout.to_dict()),
            "peft_config": "{}"}
    save_file(t, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(FormatError, match="do not match"):
        AdapterGenerator.load(tmp_path / "missing.safetensors")
    t = load_file(p)
    t["basis.qweight"] = t["basis.qweight"][:, 1:].contiguous()
    save_file(t, str(tmp_path / "badbasis.safetensors"), metadata=meta)
    with pytest.raises(FormatError, match="basis"):
        AdapterGenerator.load(tmp_path / "badbasis.safetensors")
    save_file(load_file(p), str(tmp_path / "v1.safetensors"), metadata={**meta, "format_version": "1"})
    with pytest.raises(FormatError, match="retrain"):
        AdapterGenerator.load(tmp_path / "v1.safetensors")
    save_file(load_file(p), str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(FormatError, match="not a lorakern adapter generator"):
        AdapterGenerator.load(tmp_path / "other.safetensors")


@pytest.fixture(scope="module")
def tiny_generator(tiny_llama, tmp_path_factory):
    """A generator over q/v rank-2 adapters of the tiny Llama, conditioned on its task vectors."""
    model, tok = tiny_llama
    gen = torch.Generator().manual_seed(5)
    mods = [n for n, m in model.named_modules() if n.split(".")[-1] in ("q_proj", "v_proj")]
    template = LoraAdapter({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4.0,
                            "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none"})
    for n in mods:
        lin = model.get_submodule(n)
        template.layers[n] = LoraLayer(torch.zeros(2, lin.in_features), torch.zeros(lin.out_features, 2), 2.0)
    layout = AdapterLayout.of(template)
    tasks = {}
    for i, instr in enumerate(["Shift.", "Add one.", "Copy."]):
        center = torch.randn(layout.numel, generator=gen) * 0.1
        ex = [TaskExamples(instr, ((f"a{d}", f"b{d + i}"), (f"c{d}", f"d{d}"))) for d in range(3)]
        tasks[instr] = (center + 0.01 * torch.randn(4, layout.numel, generator=gen),
                        torch.stack([task_vector(model, tok, e) for e in ex]))
    g, _ = AdapterGenerator.fit(tasks, layout, {k: v for k, v in template.config.items()}, cvae=small_cvae(),
                                train=GeneratorTrainConfig(epochs=5), progress=False)
    path = g.save(tmp_path_factory.mktemp("gen") / "tiny.safetensors")
    return g, path


def test_generated_adapter_loads_in_peft_and_lorakern(tiny_llama, tiny_generator, tmp_path):
    from peft import PeftModel
    model, tok = tiny_llama
    g, _ = tiny_generator
    ad = g.generate_from_examples(model, tok, TaskExamples("Shift.", (("a", "b"),)))
    assert all(l.A.abs().sum() > 0 for l in ad.layers.values())
    d = save_peft_adapter(ad, tmp_path / "gen")
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(2))
    pm = PeftModel.from_pretrained(copy.deepcopy(model), d).eval()
    lm = copy.deepcopy(model)
    lorakern.attach_adapters(lm, {"g": d}, dtype=torch.float32)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        got = lm(input_ids=ids, adapter_names=["g", "g"]).logits
        base = model(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # compress-adapter and the bank take it too
    from lorakern.adapters import compress_adapter, save_compressed_adapter
    save_compressed_adapter(tmp_path / "gen.safetensors", compress_adapter(load_peft_adapter(d), group_size=32))
    bank = lorakern.attach_adapters(copy.deepcopy(model), {"gq": tmp_path / "gen.safetensors"}, dtype=torch.float32)
    assert bank.names == ["gq"]


def test_generator_rejects_a_model_of_another_size(tiny_generator):
    from transformers import LlamaConfig, LlamaForCausalLM
    g, _ = tiny_generator
    other = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="hidden size 64"):
        g.generate_from_examples(other, char_tokenizer(), TaskExamples("Shift.", (("a", "b"),)))


def test_cli_generate_adapter(tiny_llama, tiny_generator, tmp_path, capsys):
    from lorakern.cli import main
    model, tok = tiny_llama
    _, gpath = tiny_generator
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    ex = tmp_path / "ex.json"
    ex.write_text(TaskExamples("Shift.", (("a b", "c d"), ("e", "f"))).to_json())
    out = tmp_path / "adapter"
    assert main(["generate-adapter", "--examples", str(ex), "--out", str(out), "--generator", str(gpath),
                 "--model", str(mdir)]) == 0
    ad = load_peft_adapter(out)
    assert sorted(ad.layers) == sorted(tiny_generator[0].layout.modules)
    assert math.isclose(next(iter(ad.layers.values())).scale, 2.0)
    ex.write_text('{"instruction": "Shift.", "examples": []}')
    capsys.readouterr()
    assert main(["generate-adapter", "--examples", str(ex), "--out", str(out), "--generator", str(gpath),
                 "--model", str(mdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakern: error: ") and "1 to" in err and str(ex) in err


def test_trajectory_keeps_the_last_checkpoints(tiny_llama, tmp_path):
    from lorakern.apps.icm import TrajectoryConfig, ensure_trajectories, load_trajectory, train_trajectory
    from lorakern.apps.icm.trajectories import save_trajectory
    model, tok = tiny_llama
    before = copy.deepcopy(model.state_dict())
    cfg = TrajectoryConfig(steps=7, keep=5, every=2, batch_size=2, warmup=1)
    traj = train_trajectory(model, tok, "caesar2", cfg, progress=False, eval_examples=2)
    assert traj.steps.tolist() == [2, 4, 6]  # the last 5 steps, every 2nd, ending with the last
    assert traj.checkpoints.dtype == torch.float16 and traj.checkpoints.shape == (3, traj.layout.numel)
    assert sorted({m.split(".")[-1] for m in traj.layout.modules}) == ["q_proj", "v_proj"]
    assert traj.layout.a_shapes[0][0] == 2
    final = flatten_adapter(traj.final, traj.layout)
    assert torch.equal(traj.checkpoints[-1], final.half())  # the last checkpoint is the final adapter
    assert not torch.equal(traj.checkpoints[0], traj.checkpoints[-1])
    for k, v in model.state_dict().items():  # the base model is left unchanged
        assert torch.equal(v, before[k])
    path = save_trajectory(traj, tmp_path)
    back = load_trajectory(path)
    assert torch.equal(back.checkpoints, traj.checkpoints) and back.record["task"] == "caesar2"
    assert set(ensure_trajectories(model, tok, ["caesar2"], cfg, root=tmp_path, progress=False)) == {"caesar2"}
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(FormatError):
        load_trajectory(path)


# -- stage 2: fine-tuning the decoder on the tasks' loss ------------------------------------------

def test_finetune_per_sequence_adapters_match_attached_ones(tiny_llama, tiny_generator):
    """The fine-tuning stage applies one generated adapter per sequence from the flat vectors; each sequence's
    logits must equal those of the same adapter attached the ordinary way (the layout's split and scales)."""
    from lorakern.adapters.attach import apply_adapter
    from lorakern.apps.icm.finetune import _GeneratedLoRA, _split_flat
    from lorakern.apps.train.trainer import injected
    model, tok = tiny_llama
    _, path = tiny_generator
    g = AdapterGenerator.load(path)
    gen = torch.Generator().manual_seed(11)
    ads = [g.generate(torch.randn(64, generator=gen) * 3, seed=s) for s in (1, 2)]
    flat = torch.stack([flatten_adapter(a, g.layout) for a in ads])
    ids = torch.randint(4, 101, (2, 9), generator=gen)
    weights = _split_flat(g, flat)
    scales = dict(zip(g.layout.modules, g.layout.scales))
    with torch.no_grad(), injected(model, list(g.layout.modules), lambda n, b: _GeneratedLoRA(n, b, scales[n], weights)):
        got = model(input_ids=ids).logits
    base = model(input_ids=ids).logits
    for i, ad in enumerate(ads):
        with torch.no_grad(), apply_adapter(model, ad):
            want = model(input_ids=ids[i:i + 1]).logits[0]
        assert (want - base[i]).abs().max() > 1e-4
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def test_finetune_trains_only_the_decoder(tiny_llama, tiny_generator):
    from lorakern.apps.icm.finetune import finetune_generator
    from lorakern.apps.train import get_task
    model, tok = tiny_llama
    _, path = tiny_generator
    g = AdapterGenerator.load(path)
    before = {k: v.clone() for k, v in g.cvae.state_dict().items()}
    basis = g.basis.decode(torch.eye(g.basis.k))
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(4)
    tasks = {n: (get_task(n), torch.randn(4, 64, generator=gen)) for n in ("addc1", "subc2")}
    hist = finetune_generator(g, model, tok, tasks, steps=3, tasks_per_step=2, examples_per_task=2, lr=1e-2,
                              progress=False)
    assert len(hist) == 3 and all(math.isfinite(h["loss"]) for h in hist)
    after = g.cvae.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("decoder."))
    assert torch.equal(g.basis.decode(torch.eye(g.basis.k)), basis)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in model_state.items())
    assert dict(model.named_modules()).keys() == modules.keys()  # the injected wrappers are gone
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    with pytest.raises(ValueError, match="no tasks"):
        finetune_generator(g, model, tok, {}, steps=1)
    with pytest.raises(ValueError, match="task vectors"):
        finetune_generator(g, model, tok, {"addc1": (get_task("addc1"), torch.randn(4, 65))}, steps=1)
    with pytest.raises(ValueError, match="positive"):
        finetune_generator(g, model, tok, tasks, steps=0)


def test_fresh_draw_model_gives_centres_and_pooled_covariance(rng):
    D, tasks, draws = 6, 4, 400
    data = [torch.randn(D, generator=rng) * 5 + torch.randn(draws, D, generator=rng) * torch.linspace(0.5, 2, D)
            for _ in range(tasks)]
    P = ConditionProjection.fit([v[:50] for v in data], shrinkage=0.5)
    centres, chol = P.fresh_draw_model(data)
    proj = [P(v) for v in data]
    torch.testing.assert_close(centres, torch.stack([p.mean(0) for p in proj]))
    resid = torch.cat([p - p.mean(0) for p in proj]).double()
    cov = resid.T @ resid / (tasks * (draws - 1))
    torch.testing.assert_close((chol.double() @ chol.double().T), cov, rtol=1e-4, atol=1e-4)
    # samples centre + chol @ N(0, I) spread like the draws
    s = torch.randn(20000, P.out_dim, generator=rng) @ chol.T
    torch.testing.assert_close(torch.cov(s.T.double()), cov, rtol=0.1, atol=0.05 * float(cov.diag().max()))
    with pytest.raises(ValueError, match="V >= 2"):
        P.fresh_draw_model([data[0][:1]])


def test_generator_config_and_fit_refuse_bad_values(rng):
    for bad in (dict(lda_shrinkage=0.0), dict(lda_shrinkage=1.5), dict(cond_dim=0), dict(cond_dim=2.5),
                dict(condition_noise=float("nan")), dict(condition_noise=-1.0), dict(basis_bits=5), dict(epochs=0)):
        with pytest.raises(ValueError):
            GeneratorTrainConfig(**bad)
    layout = AdapterLayout(("a",), ((2, 19),), ((23, 2),), (0.5,))
    tasks = tiny_tasks(rng, layout, n_tasks=2, ckpts=3)
    ck, v = tasks["t0"]
    v = v.clone()
    v[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        AdapterGenerator.fit({**tasks, "t0": (ck, v)}, layout, {}, cvae=small_cvae(), progress=False)
    with pytest.raises(ValueError, match="two tasks"):
        AdapterGenerator.fit({"t0": tasks["t0"]}, layout, {}, cvae=small_cvae(), progress=False)
    state = torch.random.get_rng_state()
    AdapterGenerator.fit(tasks, layout, {}, cvae=small_cvae(), train=GeneratorTrainConfig(epochs=1), progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched


def test_generate_defaults_to_the_prior_mean_and_matches_raw_adapters(rng):
    layout = AdapterLayout(("a",), ((2, 19),), ((23, 2),), (0.5,))
    g, _ = AdapterGenerator.fit(tiny_tasks(rng, layout, n_tasks=3, ckpts=4), layout, {}, cvae=small_cvae(),
                                train=GeneratorTrainConfig(epochs=3), progress=False)
    c = torch.randn(5, generator=rng)
    a, b = flatten_adapter(g.generate(c), layout), flatten_adapter(g.generate(c), layout)
    assert torch.equal(a, b)
    assert not torch.equal(a, flatten_adapter(g.generate(c, seed=1), layout))
    coef = g.cvae.decode(torch.zeros(1, g.cvae.cfg.latent), g.projection(c[None]))
    torch.testing.assert_close(g.raw_adapters(coef)[0], a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="coefficients"):
        g.raw_adapters(torch.zeros(1, g.basis.k + 1))


def test_hostile_generator_metadata_and_tensors_are_refused(rng, tmp_path):
    from safetensors.torch import load_file, save_file
    layout = AdapterLayout(("a",), ((2, 19),), ((23, 2),), (0.5,))
    gen, _ = AdapterGenerator.fit(tiny_tasks(rng, layout, n_tasks=2, ckpts=3), layout, {}, cvae=small_cvae(),
                                  train=GeneratorTrainConfig(epochs=1), progress=False)
    p = gen.save(tmp_path / "g.safetensors")
    good_t = load_file(p)
    good_m = {"format": "lorakern.adapter_generator", "format_version": "2",
              "cvae_config": json.dumps(gen.cvae.cfg.to_dict()), "basis": json.dumps(gen.basis.meta()),
              "layout": json.dumps(layout.to_dict()), "peft_config": "{}"}
    cfg = gen.cvae.cfg.to_dict()
    cases = [
        ({}, {"cvae_config": json.dumps({**cfg, "hidden": 32.5})}, "CVAE sizes"),
        ({}, {"cvae_config": json.dumps({**cfg, "hidden": 60000})}, "do not match"),  # checked before allocating
        ({}, {"cvae_config": '{"coef_dim": 1e999}'}, "bad metadata"),
        ({}, {"basis": json.dumps({"bits": 1, "length": layout.numel})}, "basis"),
        ({}, {"basis": json.dumps({"bits": 16, "length": layout.numel})}, "basis"),
        ({}, {"basis": json.dumps({"bits": 3, "length": -4})}, "basis"),
        ({}, {"basis": '{"bits": 3, "length": 1e999}'}, "basis"),
        ({}, {"layout": '{"modules": ["a"], "a_shapes": [[2, 1e999]], "b_shapes": [[23, 2]], "scales": [0.5]}'},
         "bad metadata"),
        ({"cond.weight": good_t["cond.weight"].to(torch.int32)}, {}, "float32"),
        ({"norm.mean": good_t["norm.mean"].half()}, {}, "float32"),
        ({"cond.std": -good_t["cond.std"]}, {}, "positive std"),
        ({"cvae.coef_std": torch.zeros_like(good_t["cvae.coef_std"])}, {}, "not positive"),
        ({"basis.mean": good_t["basis.mean"][:-1].contiguous()}, {}, "basis"),
    ]
    for i, (tensors, meta, match) in enumerate(cases):
        f = tmp_path / f"bad{i}.safetensors"
        save_file({**good_t, **tensors}, str(f), metadata={**good_m, **meta})
        with pytest.raises(FormatError, match=match):
            AdapterGenerator.load(f)
