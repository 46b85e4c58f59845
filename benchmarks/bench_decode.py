"""Decode speed of SmolLM2-135M through transformers' ``generate``: lorakern against transformers and llama.cpp
in one run, one stream and 64 streams on 64 different adapters.

    python benchmarks/bench_decode.py [--quick] [--json PATH]

Greedy decode of a 32-token prompt (WikiText-2 test text), ``torch.get_num_threads()`` threads (2 here), medians
of repeats (:func:`lorakern.apps.evaluation.decode_speed`: a warm-up call, then ``generate`` of 1 and of N new
tokens; tokens/s is the difference, TTFT the 1-token call). Rows:

* batch 1: ``transformers_fp32`` (the fp32 model as transformers runs it), ``lorakern_rtn`` 4- and 3-bit,
  ``lorakern_gwq`` 4-bit (1% gradient outliers), each with three decode steps, all through
  :func:`lorakern.prepare_decode` (static cache): eager (``compiled: false``), compiled (torch.compile; the
  compilation is excluded, it happens in the warm-up) and, for the quantized models, native
  (``native: true``: one C++ call per decoder layer, :mod:`lorakern.models.native`); prefill throughput of a
  512-token prompt (one forward, logits of the last position only, as ``generate`` and llama.cpp compute them)
  per model. Then GWQ-4 against RTN-4, both native, timed alternately (5 rounds): the GWQ target's figure
  (``gwq4_vs_rtn4_native_paired``; the ratio of the two rows, timed minutes apart, is reported beside it).
* peer: llama.cpp through ``llama-cpp-python`` on the shipped Q4_1 GGUF and on a Q4_0 GGUF made from it by
  llama.cpp's own quantizer, same threads, same prompt tokens and token counts (``llama_eval`` + argmax);
  rows left out, with the reason printed, if the package is missing. With one rank-16 LoRA adapter (all seven
  projections, random values: speed only) on the Q4_0 model: the PEFT adapter is converted by llama.cpp's own
  ``convert_lora_to_gguf.py``, which the wheel does not install; it is taken from the source distribution of
  the installed version (``--llama-cpp-sdist PATH``, else ``pip download --no-binary`` into
  ~/.cache/lorakern/llama_cpp_src); if that fails the row is left out, said so. lorakern's matching rows are
  RTN-4 with the same rank-16 adapter: fp32 factors in a ``LoRALinear`` (``attach_adapter``), compiled; and fp16
  factors in an adapter bank (``attach_adapters``, ``adapter_names=["a0"]``), native (the bank's kernels inside
  the C++ decode step).
* batch 64, 4-bit RTN base: no adapter (compiled and native); one adapter for all 64 streams (compiled and
  native); 64 distinct fp16 adapters (native); 64 distinct LoRAQuant-compressed adapters drawn from a bank of
  1,000 resident ones (rank 16 on all seven projections of every layer, h = 4 components at 2 bits; random codes:
  their values do not matter for speed; --quick: 100 resident; compiled and native); and PEFT's mixed batch with
  64 distinct fp32 adapters on the fp32 model as the peer. The ratios take each configuration's fastest step.
  Then one adapter against 64 compressed ones, both native, timed alternately (5 rounds; quick: 3): the target's
  figure (``compressed64_vs_one_adapter_native_paired``; the ratio of the two rows is reported beside it), and the
  compressed rate the PEFT ratio uses (the median of its 5 rounds). A row's tokens/s is the difference of two
  ``generate`` calls; at batch 64 the prefill of 2,048 tokens is a large part of both, so one slow 1-token call
  inflates that row (seen once: 1,112 tokens/s for a configuration whose paired rounds gave 722-752).
  ``--ratios-only`` recomputes the ratios, table and plot from a JSON file's rows and rounds; ``--skip-batch1``
  runs the 64-stream rows only (give ``--json`` another file to keep a full run's results).

JSON rows ``{"impl", "bits", "batch", "adapters", "resident_adapters", "compiled", "native", "tokens_per_s",
"prefill_tokens_per_s", "ttft_ms", "peak_rss_mb"}`` (the process's peak RSS during the row: the kernel's
high-water mark is reset before it, but what the process already holds -- the fp32 model the variants are
copied from, earlier rows' leftovers, the RTN-4 and GWQ-4 models kept for the paired measurement -- is included,
so read differences between lorakern's rows, not absolute values; the llama.cpp rows run in a child process
holding no torch model: their RSS is that child's own) in benchmarks/results/decode.json, a markdown table and a PNG of tokens/s
per configuration beside it (quick: decode_quick.*).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

from common import machine_info, write_json

import lorakern
from lorakern.adapters import attach_adapter
from lorakern.apps.evaluation import decode_speed, read_wikitext
from lorakern.formats.lora import LoraLayer
from lorakern.models import load_smollm2
from lorakern.models.smollm2 import gguf_path

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LLAMACPP_DEADLINE_S = 1800  # the llama.cpp child's whole run (its rows take ~1 min here; the LoRA converter's download more)


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the resident-set high-water mark (VmHWM)
    except OSError:
        pass


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def row(impl, bits, batch, adapters, resident, compiled, tokens_per_s, prefill=None, ttft=None, native=False,
        **extra):
    r = {"impl": impl, "bits": bits, "batch": batch, "adapters": adapters, "resident_adapters": resident,
         "compiled": compiled, "native": native, "tokens_per_s": tokens_per_s, "prefill_tokens_per_s": prefill,
         "ttft_ms": ttft, "peak_rss_mb": peak_rss_mb(), **extra}
    pre = f"{prefill:8.0f}" if prefill else "       -"
    print(f"  {impl:18} {bits!s:>4} b={batch:<3} adapters={adapters!s:<10} resident={resident!s:<5} "
          f"{mode_name(r):8} {tokens_per_s:8.1f} tok/s  prefill {pre} tok/s  rss {r['peak_rss_mb']:6.0f} MB",
          flush=True)
    return r


def mode_name(r) -> str:
    return "native" if r.get("native") else ("compiled" if r["compiled"] else "eager")


@torch.no_grad()
def prefill_rate(model, ids512, repeats, **kw) -> float:
    """Tokens/s of one forward over the prompt with the logits of its last position only (what ``generate``'s
    prefill computes, ``logits_to_keep=1``, and what llama.cpp's prefill computes); ``kw``: ``adapter_names``."""
    ts = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model(ids512, logits_to_keep=1, **kw)
        ts.append(time.perf_counter() - t0)
    return ids512.shape[1] / statistics.median(ts[1:])


def batch1_rows(model, tok, ids, ids512, a, rows, peft16):
    from lorakern.quant import calibration_windows, collect_statistics
    variants = [("transformers_fp32", 32, lambda: copy.deepcopy(model))]
    variants.append(("lorakern_rtn", 4, lambda: lorakern.quantize_model(copy.deepcopy(model), bits=4, progress=False)))
    stats = None

    def gwq():
        nonlocal stats
        if stats is None:
            names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
            stats = collect_statistics(model, calibration_windows(tok, 2 if a.quick else 8, 512), names,
                                       gradients=True, hessians=True, progress=False)
        return lorakern.quantize_model(copy.deepcopy(model), bits=4, method="gwq", statistics=stats, progress=False)
    variants.append(("lorakern_gwq", 4, gwq))
    variants.append(("lorakern_rtn", 3, lambda: lorakern.quantize_model(copy.deepcopy(model), bits=3,
                                                                          progress=False)))

    def with_lora():  # the rank-16 adapter llama.cpp's LoRA row runs (fp32 factors, LoRALinear)
        m = lorakern.quantize_model(copy.deepcopy(model), bits=4, progress=False)
        attach_adapter(m, peft16)
        return m
    variants.append(("lorakern_rtn", 4, with_lora, 1))

    def with_bank():  # the same adapter in an adapter bank (fp16 factors): its decode step is native
        m = lorakern.quantize_model(copy.deepcopy(model), bits=4, progress=False)
        lorakern.attach_adapters(m, {"a0": peft16})
        return m
    variants.append(("lorakern_rtn", 4, with_bank, 1, ["a0"]))
    kept = {}  # the native RTN-4 and GWQ-4 models, for the paired measurement after the rows
    for impl, bits, make, *extra in variants:
        n_ad = extra[0] if extra else 0
        kw = {"adapter_names": extra[1]} if len(extra) > 1 else {}
        m = make()
        pre = prefill_rate(m, ids512, a.repeats, **kw)
        # (compiled, native): the adapter rows run one step each: LoRALinear compiled, the bank native
        modes = [(False, False), (True, False)] if not n_ad else ([(False, True)] if kw else [(True, False)])
        if impl != "transformers_fp32" and not n_ad:
            modes.append((False, True))  # the native decode step (lorakern.models.native)
        for compiled, native in modes:
            reset_peak_rss()
            lorakern.prepare_decode(m, compile=compiled, native=native)
            s = decode_speed(m, ids, a.new_tokens, a.repeats, **kw)
            rows.append(row(impl, bits, 1, n_ad, n_ad, compiled, s.tokens_per_s, pre, s.ttft_ms, native=native))
        if bits == 4 and not n_ad and impl in ("lorakern_rtn", "lorakern_gwq"):
            kept[impl] = m  # prepared native (the last mode)
        del m
        torch._dynamo.reset()
    return paired_rates(("rtn4", kept["lorakern_rtn"], {}), ("gwq4", kept["lorakern_gwq"], {}), ids, a.new_tokens,
                        a.repeats)


def paired_rates(ref, other, ids, new_tokens, repeats, rounds: int = 5) -> dict:
    """Two prepared models timed alternately in the same minutes (decode_speed of one, then of the other,
    ``rounds`` times), for a target that is the ratio of the two: the rows time each configuration in its own
    stretch of the run, and this shared machine's speed drifts by more than the 10-20% such targets leave (RTN-4
    alone ranged 110-180 tokens/s over one session). ``ref`` and ``other``: (name, model, generate kwargs).
    Returns the per-round tokens/s (``<name>_tokens_per_s``), ratios other / ref and their median."""
    (rn, rm, rkw), (on, om, okw) = ref, other
    r, o = [], []
    for _ in range(rounds):
        r.append(decode_speed(rm, ids, new_tokens, repeats, **rkw).tokens_per_s)
        o.append(decode_speed(om, ids, new_tokens, repeats, **okw).tokens_per_s)
    ratios_ = [b / x for x, b in zip(r, o)]
    out = {f"{rn}_tokens_per_s": r, f"{on}_tokens_per_s": o, "ratio_per_round": ratios_,
           "median_ratio": statistics.median(ratios_)}
    print(f"  paired native {on} / {rn} over {rounds} rounds: {[round(x, 3) for x in ratios_]}, median "
          f"{out['median_ratio']:.3f}", flush=True)
    return out


def llamacpp_rows(peft_dir, ids, ids512, a, rows, tmpdir):
    """The llama.cpp rows, measured in a child process: a llama.cpp build that crashes (llama-cpp-python 0.3.36
    built with its defaults segfaulted in its first ``eval`` on this machine's AMX cores) then leaves its rows out
    with the reason printed, and the run goes on."""
    import importlib.util
    import multiprocessing as mp
    if importlib.util.find_spec("llama_cpp") is None:
        print("  llama.cpp: left out (llama_cpp is not installed); pip install llama-cpp-python (builds llama.cpp, "
              "5-20 min on 2 cores)")
        return
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    child = ctx.Process(target=_llamacpp_child, args=(q, peft_dir, ids, ids512, a, tmpdir))
    child.start()
    got, deadline = None, time.time() + LLAMACPP_DEADLINE_S
    while got is None and (child.is_alive() or not q.empty()) and time.time() < deadline:
        try:
            got = q.get(timeout=5)
        except Exception:  # queue.Empty: keep waiting while the child lives
            pass
    if got is None and child.is_alive():
        child.kill()
        print(f"  llama.cpp: left out: no rows after {LLAMACPP_DEADLINE_S} s; its process was killed")
    child.join()
    if got is None:
        if child.exitcode:
            print(f"  llama.cpp: left out: its process ended with code {child.exitcode} (negative: the signal that "
                  "killed it; 1: a Python exception, printed above) before returning rows")
        return
    rows.extend(got)


def _llamacpp_child(q, peft_dir, ids, ids512, a, tmpdir):
    torch.set_num_threads(a.threads)
    out = []
    _llamacpp_rows(peft_dir, ids, ids512, a, out, tmpdir)
    q.put(out)


def _llamacpp_rows(peft_dir, ids, ids512, a, rows, tmpdir):
    try:
        import llama_cpp
        import numpy as np
    except ImportError as e:
        print(f"  llama.cpp: left out ({e}); pip install llama-cpp-python (builds llama.cpp, ~12 min on 2 cores)")
        return
    src = str(gguf_path())
    q40 = os.path.join(tmpdir, "smollm2-q4_0.gguf")
    if not os.path.exists(q40):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True  # from the shipped Q4_1 (llama.cpp's own quantizer, as the issue asks)
        if llama_cpp.llama_model_quantize(src.encode(), q40.encode(), params) != 0:
            print("  llama.cpp: Q4_0 quantization failed; that row is left out")
            q40 = None
    prompt, long = ids[0].tolist(), ids512[0].tolist()
    lora = llamacpp_lora(peft_dir, a, tmpdir) if q40 else None
    for name, path, lora_path in (("llamacpp_q4_1", src, None), ("llamacpp_q4_0", q40, None),
                                  ("llamacpp_q4_0", q40 if lora else None, lora)):
        if path is None:
            continue
        reset_peak_rss()
        llm = llama_cpp.Llama(model_path=path, n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
                              n_ctx=1024, n_batch=512, verbose=False, lora_path=lora_path)

        def decode():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            t1 = time.perf_counter()
            for _ in range(a.new_tokens - 1):
                llm.eval([nxt])
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            return (a.new_tokens - 1) / (time.perf_counter() - t1), 1e3 * (t1 - t0)

        def prefill():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(long)
            return len(long) / (time.perf_counter() - t0)
        decode()
        runs = [decode() for _ in range(a.repeats)]
        pre = statistics.median(prefill() for _ in range(a.repeats))
        n_ad = 1 if lora_path else 0
        rows.append(row(name, 4, 1, n_ad, n_ad, False, statistics.median(r[0] for r in runs), pre,
                        statistics.median(r[1] for r in runs)))
        del llm


def llamacpp_converter(a) -> str | None:
    """llama.cpp's vendored source tree (its ``convert_lora_to_gguf.py``, ``conversion/`` and ``gguf-py/``) from
    the llama-cpp-python source distribution of the installed version; None (reason printed) if unreachable."""
    import glob
    import subprocess
    import tarfile

    import llama_cpp
    root = os.path.join(os.path.expanduser("~"), ".cache", "lorakern", "llama_cpp_src", llama_cpp.__version__)
    tree = os.path.join(root, "llama.cpp")
    if os.path.exists(os.path.join(tree, "convert_lora_to_gguf.py")):
        return tree
    sdist = a.llama_cpp_sdist
    if sdist is None:
        os.makedirs(root, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={llama_cpp.__version__}", "-d", root], capture_output=True, text=True)
        found = glob.glob(os.path.join(root, "llama_cpp_python-*.tar.gz"))
        if r.returncode or not found:
            print(f"  llama.cpp + LoRA: left out: the source distribution could not be fetched ({r.stderr[-200:]})")
            return None
        sdist = found[0]
    keep = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name
                   and m.name.split("/vendor/llama.cpp/", 1)[1].startswith(keep) and (m.isfile() or m.isdir())]
        if not members:
            print(f"  llama.cpp + LoRA: left out: {sdist} holds no convert_lora_to_gguf.py")
            return None
        for m in members:
            m.name = "llama.cpp/" + m.name.split("/vendor/llama.cpp/", 1)[1]
        tf.extractall(root, members=members, filter="data")
    return tree


def llamacpp_lora(peft_dir, a, tmpdir) -> str | None:
    """The rank-16 PEFT adapter as llama.cpp's GGUF LoRA (f16, llama.cpp's converter); None if not possible."""
    import subprocess

    from lorakern.data.cache import cache_dir
    tree = llamacpp_converter(a)
    if tree is None:
        return None
    out = os.path.join(tmpdir, "lora16.gguf")
    env = {**os.environ, "PYTHONPATH": os.path.join(tree, "gguf-py")}
    r = subprocess.run([sys.executable, os.path.join(tree, "convert_lora_to_gguf.py"), "--base",
                        str(cache_dir() / "smollm2-135m-instruct"),
                        "--outfile", out, "--outtype", "f16", str(peft_dir)], capture_output=True, text=True, env=env)
    if r.returncode or not os.path.exists(out):
        print(f"  llama.cpp + LoRA: left out: convert_lora_to_gguf.py failed: {r.stderr[-400:]}")
        return None
    return out


def dense_adapter(gen, shapes, rank=16):
    return {n: LoraLayer(torch.randn(rank, K, generator=gen) * 0.02, torch.randn(N, rank, generator=gen) * 0.02, 2.0)
            for n, (N, K) in shapes.items()}


def compressed_adapter(gen, shapes, rank=16, h=4):
    from lorakern.testing import random_compressed
    return {n: random_compressed(N, K, rank, h, 2, 64, 64, gen, scale=0.5)
            for n, (N, K) in shapes.items()}


def batch64_rows(model, prompts, a, rows):
    gen = torch.Generator().manual_seed(0)
    base = lorakern.quantize_model(copy.deepcopy(model), bits=4, progress=False)
    shapes = {n: (m.out_features, m.in_features) for n, m in base.named_modules() if n.split(".")[-1] in PROJ}
    B = prompts.shape[0]
    n_res = 100 if a.quick else 1000

    def measure(m, adapters, resident, names=None, impl="lorakern_rtn", compiled=True, bits=4, native=False):
        reset_peak_rss()
        lorakern.prepare_decode(m, compile=compiled, native=native)
        kw = {"adapter_names": names} if names is not None else {}
        s = decode_speed(m, prompts, a.new_tokens_b64, max(1, a.repeats - 1), **kw)
        rows.append(row(impl, bits, B, adapters, resident, compiled, s.tokens_per_s, s.prefill_tokens_per_s,
                        s.ttft_ms, native=native))
        torch._dynamo.reset()

    measure(base, 0, 0)
    measure(base, 0, 0, compiled=False, native=True)
    one = copy.deepcopy(base)
    lorakern.attach_adapters(one, {"a0": dense_adapter(gen, shapes)}, dtype=torch.float16)
    measure(one, 1, 1, ["a0"] * B)
    measure(one, 1, 1, ["a0"] * B, compiled=False, native=True)  # (kept, prepared native, for the paired rounds)
    fp = copy.deepcopy(base)
    lorakern.attach_adapters(fp, {f"a{i}": dense_adapter(gen, shapes) for i in range(B)}, dtype=torch.float16)
    measure(fp, B, B, [f"a{i}" for i in range(B)], compiled=False, native=True)
    del fp
    cq = copy.deepcopy(base)
    t0 = time.time()
    template = compressed_adapter(gen, shapes)  # values do not matter: every resident adapter gets its own rows
    bank = lorakern.attach_adapters(cq, {"c0": template}, dtype=torch.float16)
    for i in range(1, n_res):
        bank.add(f"c{i}", template)
    resident_bytes = sum(bank.nbytes(n) for n in bank.names)
    print(f"  {n_res} resident compressed adapters: {resident_bytes / 2**30:.3f} GiB in the bank "
          f"({resident_bytes / n_res / 2**20:.2f} MiB each), built in {time.time() - t0:.0f} s")
    pick = torch.randperm(n_res, generator=gen)[:B].tolist()
    measure(cq, B, n_res, [f"c{i}" for i in pick])
    rows[-1]["resident_bytes"] = resident_bytes
    measure(cq, B, n_res, [f"c{i}" for i in pick], compiled=False, native=True)
    rows[-1]["resident_bytes"] = resident_bytes
    paired = paired_rates(("one_adapter", one, {"adapter_names": ["a0"] * B}),
                          ("compressed64", cq, {"adapter_names": [f"c{i}" for i in pick]}), prompts,
                          a.new_tokens_b64, max(1, a.repeats - 1), rounds=3 if a.quick else 5)
    del cq, bank, one
    peft_rows(model, prompts, shapes, a, rows, gen)
    return paired


def peft_rows(model, prompts, shapes, a, rows, gen):
    try:
        import peft
    except ImportError as e:
        print(f"  peft: left out ({e})")
        return
    B = prompts.shape[0]
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(PROJ), init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg, adapter_name="a0")
    for i in range(1, B):
        pm.add_adapter(f"a{i}", cfg)
    pm.eval()
    reset_peak_rss()
    s = decode_speed(pm, prompts, a.new_tokens_b64, max(1, a.repeats - 1), adapter_names=[f"a{i}" for i in range(B)])
    rows.append(row("peft", 32, B, B, B, False, s.tokens_per_s, s.prefill_tokens_per_s, s.ttft_ms))


def write_outputs(payload, path):
    write_json(path, payload)
    md = os.path.splitext(path)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"# Decode speed (SmolLM2-135M, {payload['machine']['cpu']}, {payload['machine']['threads']} threads)\n\n")
        f.write("| impl | bits | batch | adapters | resident | decode step | tokens/s | prefill tok/s | TTFT ms | peak RSS MB |\n")
        f.write("|---|---|---|---|---|---|---|---|---|---|\n")
        for r in payload["rows"]:
            pre = f"{r['prefill_tokens_per_s']:.0f}" if r["prefill_tokens_per_s"] else "-"
            ttft = f"{r['ttft_ms']:.0f}" if r["ttft_ms"] else "-"
            f.write(f"| {r['impl']} | {r['bits']} | {r['batch']} | {r['adapters']} | {r['resident_adapters']} | "
                    f"{mode_name(r)} | {r['tokens_per_s']:.1f} | {pre} | {ttft} | {r['peak_rss_mb']:.0f} |\n")
        f.write("\n" + "\n".join(f"- {k}: {v}" for k, v in payload["ratios"].items()) + "\n")
    print(f"wrote {md}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, b in zip(axes, (1, 64)):
        rs = [r for r in payload["rows"] if r["batch"] == b]
        labels = [f"{r['impl']} {r['bits']}b" + (f" {r['adapters']}ad/{r['resident_adapters']}" if r["adapters"] else "")
                  + f" {mode_name(r)}" for r in rs]
        colors = ["tab:orange" if r["impl"].startswith(("llamacpp", "transformers", "peft")) else "tab:blue" for r in rs]
        ax.barh(range(len(rs)), [r["tokens_per_s"] for r in rs], color=colors)
        ax.set_yticks(range(len(rs)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s (all streams)")
        ax.set_title(f"batch {b}" + (" (64 streams)" if b > 1 else " (one stream)"))
    fig.suptitle(f"SmolLM2-135M decode, {payload['machine']['cpu']}, {payload['machine']['threads']} threads "
                 "(orange: peers)")
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def ratios(rows, paired: dict | None = None, paired64: dict | None = None) -> dict:
    """The targets' ratios from the rows (and the paired measurements, GWQ-4 / RTN-4 and 64 compressed adapters /
    one adapter, when they ran)."""
    def get(impl, bits=None, batch=1, compiled=None, adapters=None, resident=None):
        for r in rows:
            if r["impl"] == impl and r["batch"] == batch and (bits is None or r["bits"] == bits) and \
                    (compiled is None or r["compiled"] == compiled) and (adapters is None or r["adapters"] == adapters) \
                    and (resident is None or r["resident_adapters"] == resident):
                return r
        return None
    def best(rs):  # the fastest decode step of a configuration
        return max(rs, key=lambda r: r["tokens_per_s"], default=None)
    out = {}
    best4 = max((r for r in rows if r["impl"] == "lorakern_rtn" and r["bits"] == 4 and r["batch"] == 1
                 and not r["adapters"]), key=lambda r: r["tokens_per_s"], default=None)
    q40, q41 = get("llamacpp_q4_0", adapters=0), get("llamacpp_q4_1", adapters=0)
    q40_lora = get("llamacpp_q4_0", adapters=1)
    rtn_lora = best(r for r in rows if r["impl"] == "lorakern_rtn" and r["bits"] == 4 and r["batch"] == 1
                    and r["adapters"] == 1)
    if q40_lora and rtn_lora:
        out["batch1_4bit_rank16_lora_vs_llamacpp_q4_0_lora"] = round(rtn_lora["tokens_per_s"] /
                                                                     q40_lora["tokens_per_s"], 3)
        out["batch1_4bit_rank16_lora_best_decode_step"] = mode_name(rtn_lora)
    if best4 and q40:
        out["batch1_4bit_vs_llamacpp_q4_0 (target >= 1.0)"] = round(best4["tokens_per_s"] / q40["tokens_per_s"], 3)
        out["prefill512_4bit_vs_llamacpp_q4_0 (target >= 1.0)"] = round(best4["prefill_tokens_per_s"] /
                                                                         q40["prefill_tokens_per_s"], 3)
    if best4 and q41:
        out["batch1_4bit_vs_llamacpp_q4_1"] = round(best4["tokens_per_s"] / q41["tokens_per_s"], 3)
    g4 = max((r for r in rows if r["impl"] == "lorakern_gwq" and r["batch"] == 1), key=lambda r: r["tokens_per_s"],
             default=None)
    if g4 and best4:
        out["gwq4_vs_rtn4_best_step (rows timed apart)"] = round(g4["tokens_per_s"] / best4["tokens_per_s"], 3)
    if paired:
        out["gwq4_vs_rtn4_native_paired_median (target >= 0.9)"] = round(paired["median_ratio"], 3)
    if best4:
        out["batch1_4bit_best_decode_step"] = mode_name(best4)
    one = best(r for r in rows if r["impl"] == "lorakern_rtn" and r["batch"] == 64 and r["adapters"] == 1)
    cq = best(r for r in rows if r["batch"] == 64 and r["resident_adapters"] > 64)
    pf = get("peft", batch=64)
    if one and cq:
        out["64_compressed_of_resident_vs_one_adapter (rows timed apart)"] = round(cq["tokens_per_s"] /
                                                                                  one["tokens_per_s"], 3)
    if paired64:
        out["64_compressed_of_resident_vs_one_adapter_native_paired_median (target >= 0.8)"] = round(
            paired64["median_ratio"], 3)
    if one and cq:
        out["batch64_best_decode_steps (one adapter, 64 compressed)"] = f"{mode_name(one)}, {mode_name(cq)}"
    if pf and paired64:  # the compressed rate as the median of the paired rounds: one row's rate can be far off (below)
        out["64_compressed_vs_peft_mixed (target >= 10; compressed: median of the paired rounds)"] = round(
            statistics.median(paired64["compressed64_tokens_per_s"]) / pf["tokens_per_s"], 2)
    elif cq and pf:
        out["64_compressed_vs_peft_mixed (target >= 10)"] = round(cq["tokens_per_s"] / pf["tokens_per_s"], 2)
    if cq and "resident_bytes" in cq:
        out[f"{cq['resident_adapters']}_resident_compressed_GiB (1000: target <= 1.5 GB)"] = round(
            cq["resident_bytes"] / 2**30, 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats, 100 resident adapters (~10 min)")
    ap.add_argument("--json", help="results (default benchmarks/results/decode.json; quick: decode_quick.json)")
    ap.add_argument("--skip-batch64", action="store_true", help="one stream only")
    ap.add_argument("--skip-batch1", action="store_true", help="the 64-stream rows only (and their ratios), e.g. "
                    "after a change to the multi-adapter kernels; give --json another file to keep the full run's")
    ap.add_argument("--ratios-only", action="store_true", help="recompute the ratios, table and plot of an existing "
                    "--json file (its rows and paired rounds as measured), without running anything")
    ap.add_argument("--llama-cpp-sdist", help="llama-cpp-python's source distribution (.tar.gz), for llama.cpp's "
                    "LoRA converter (default: pip download of the installed version)")
    a = ap.parse_args(argv)
    a.new_tokens = 32 if a.quick else 128
    a.new_tokens_b64 = 8 if a.quick else 32
    a.repeats = 2 if a.quick else 3
    a.threads = torch.get_num_threads()
    path = a.json or os.path.join(RESULTS, "decode_quick.json" if a.quick else "decode.json")
    if a.ratios_only:
        import json
        with open(path) as f:
            payload = json.load(f)
        payload["ratios"] = ratios(payload["rows"], payload.get("gwq4_vs_rtn4_native_paired"),
                                   payload.get("compressed64_vs_one_adapter_native_paired"))
        for k, v in payload["ratios"].items():
            print(f"  {k}: {v}")
        write_outputs(payload, path)
        return 0
    info = machine_info()
    print(f"machine: {info}")
    torch.manual_seed(0)
    model, tok = load_smollm2()
    ids_all = tok(read_wikitext("test", max_chars=400_000), return_tensors="pt").input_ids[0]
    ids = ids_all[1000:1032].unsqueeze(0)
    ids512 = ids_all[2000:2512].unsqueeze(0)
    prompts = torch.stack([ids_all[4000 + 32 * i: 4032 + 32 * i] for i in range(64)])
    rows = []
    paired = None
    import tempfile
    if not a.skip_batch1:
        with tempfile.TemporaryDirectory() as tmp:
            print("batch 1:")
            from pathlib import Path

            from lorakern.testing import save_random_peft_adapters
            peft16 = save_random_peft_adapters(model, Path(tmp), {"lora16": list(PROJ)}, 0.01,
                                               rank=lambda i: 16)["lora16"]
            llamacpp_rows(peft16, ids, ids512, a, rows, tmp)
            paired = batch1_rows(model, tok, ids, ids512, a, rows, peft16)
    paired64 = None
    if not a.skip_batch64:
        print("batch 64:")
        paired64 = batch64_rows(model, prompts, a, rows)
    payload = {"machine": info, "model": "SmolLM2-135M-Instruct", "prompt_tokens": 32, "new_tokens": a.new_tokens,
               "new_tokens_batch64": a.new_tokens_b64, "repeats": a.repeats, "rows": rows,
               "gwq4_vs_rtn4_native_paired": paired, "compressed64_vs_one_adapter_native_paired": paired64,
               "ratios": ratios(rows, paired, paired64)}
    for k, v in payload["ratios"].items():
        print(f"  {k}: {v}")
    write_outputs(payload, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
