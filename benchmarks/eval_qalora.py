"""QA-LoRA end to end on SmolLM2-135M: fine-tune on a low-bit base, merge into its zeros, compare with LoRA.

    python benchmarks/eval_qalora.py [--quick] [--json PATH] [--tasks ...] [--bits 4 3 2] [--steps N]
                                     [--batch-size N] [--eval-examples N] [--quantizer rtn|gptq]
                                     [--resume [--retime]] [--decode-repeats N] [--report]

For every task of the adapter suite (the six generated tasks and the WikiText-2 language-modelling adapter)
and every base (SmolLM2-135M-Instruct's decoder projections quantized at 4, 3 and 2 bits, groups of 32,
RTN by default), each form is scored on the same held-out examples:

* ``qalora_merged`` (i): a QA-LoRA adapter (arXiv 2309.14717; ``TrainConfig(qalora=True)``) trained on the
  quantized base, folded into its fp16 zeros (``merge_qalora_adapter``): a plain quantized model;
* ``qalora_unmerged``: the same adapter kept beside the base (``QALoRALinear``, one fused op per layer);
* ``lora_merged_requant`` (ii): a LoRA adapter trained on the same quantized base, merged into the dequantized
  weights and re-quantized by RTN at the base's bits and groups (the usual lossy path; with ``--quantizer gptq``
  the base is GPTQ's, calibrated on 8 windows of 512 tokens of WikiText-2's valid split, and the
  re-quantization still RTN: GPTQ would need calibration of the merged model);
* ``lora_unmerged`` (iii): that LoRA kept unmerged on the quantized base (fp16 factors);
* ``lora_fp16`` (iv): LoRA trained on the full-precision base, fp16 factors (the upper bound; ``base_bits`` 32);
* ``base``: the quantized base alone (and the fp32 base, ``base_bits`` 32).

Same rank (16), alpha (32), targets (all seven projections), steps, batch, learning rate and seed for every
trained adapter. Metric: exact match of greedy answers on ``--eval-examples`` held-out examples (binomial SE
sqrt(p (1 - p) / n): <= 0.05 at n = 100), or WikiText-2 test perplexity on 4 windows of 512 tokens for the LM
adapter. ``avg_bits``: stored bits per weight of the decoder's projections (codes + fp16 scale and zero per
group of 32 = bits + 1; an unmerged adapter's fp16 factors added; 32 for the fp32 base). ``decode_ms``: time per
generated token, batch 1, 32 new tokens after a 16-token prompt, eager ``generate``, median of
``--decode-repeats`` (5) rounds interleaved over the forms of one base (the first task's adapters). Also
measured: the peak RSS of training on the 4-bit base (loaded from its quantized directory) and on the fp32 base,
each in a fresh process.

Trained adapters are cached under ``$LORAKERN_CACHE/qalora_eval/<settings>/`` so an interrupted run resumes;
``--resume`` also keeps the complete tasks' rows, decode times and peak RSS from the JSON; ``--resume --retime``
measures every form's decode time again (with the first complete task's cached adapters, trained again where the
cache is not on this machine), so that all of them come from the machine the JSON names. The JSON's ``provenance``
(and a line under the tables) names the machine of any kept metric rows, decode times and peak RSS that another
machine measured.
Rows ``{"task", "base_bits", "method", "metric", "metric_name", "higher_is_better", "avg_bits", "decode_ms"}``
go to benchmarks/results/qalora.json (quick: qalora_quick.json) with a markdown table beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from dataclasses import replace
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import machine_info, write_json

from lorakern.adapters import apply_adapter, attach_adapter, detach_adapter, load_peft_adapter, save_peft_adapter
from lorakern.adapters.qalora import merge_qalora_adapter
from lorakern.apps.train import TrainConfig, get_task, train_lm_adapter, train_task_adapter
from lorakern.apps.train.suite import LM_ADAPTER, default_config, evaluate_adapter_metric, metric_info, suite_names
from lorakern.data import read_wikitext
from lorakern.data.cache import cache_dir
from lorakern.models import QuantConfig, load_smollm2, quantize_model
from lorakern.models.checkpoint import load_quantized_model, save_quantized_model
from lorakern.nn import GWQLinear, QuantLinear
from lorakern.nn.swap import replace_module
from lorakern.quant import calibration_windows, quantize_rtn

GROUP = 32
RANK, ALPHA = 16, 32.0
METHODS = ("qalora_merged", "qalora_unmerged", "lora_merged_requant", "lora_unmerged", "lora_fp16", "base")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_config(name: str, a, qalora: bool) -> TrainConfig:
    """The suite's settings for ``name`` with this run's budget (the LM adapter: half the steps, its own batch)."""
    cfg = default_config(name)
    if name == LM_ADAPTER:
        return replace(cfg, rank=RANK, alpha=ALPHA, steps=max(10, a.steps // 2), qalora=qalora)
    return replace(cfg, rank=RANK, alpha=ALPHA, steps=a.steps, batch_size=a.batch_size, qalora=qalora)


def trained(model, tok, name: str, a, qalora: bool, where: Path):
    """The adapter for task ``name`` trained on ``model`` (cached in ``where``); (adapter, seconds or None)."""
    if (where / "adapter_config.json").is_file():
        return load_peft_adapter(where), None
    cfg = train_config(name, a, qalora)
    t0 = time.perf_counter()
    if name == LM_ADAPTER:
        adapter = train_lm_adapter(model, tok, read_wikitext("valid"), cfg, progress=False, name=name)
    else:
        adapter = train_task_adapter(model, tok, get_task(name), cfg, progress=False)
    seconds = time.perf_counter() - t0
    save_peft_adapter(adapter, where)
    (where / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
    return load_peft_adapter(where), seconds  # as served: through the file


def quantized_base(fp_model, tok, bits: int, a, where: Path):
    """The fp32 model quantized at ``bits`` (cached as a lorakern model directory)."""
    if (where / "lorakern_quantization.json").is_file():
        return load_quantized_model(where)
    model = copy.deepcopy(fp_model)
    cal = calibration_windows(tok, 8, 512) if a.quantizer == "gptq" else None  # WikiText-2 valid, as eval_quant_ppl
    quantize_model(model, QuantConfig(method=a.quantizer, bits=bits, group_size=GROUP), calibration=cal,
                   progress=False)
    save_quantized_model(model, where, tok)
    return load_quantized_model(where)


def merged_qalora(qmodel, adapter):
    """A copy of the quantized model with the QA-LoRA adapter folded into its zeros (form (i))."""
    model = copy.deepcopy(qmodel)
    merge_qalora_adapter(model, adapter)
    return model


def merged_requant(qmodel, adapter, bits: int):
    """LoRA merged into the dequantized weights, re-quantized (RTN, same bits and groups): the lossy path."""
    model = copy.deepcopy(qmodel)
    with torch.no_grad():
        for name, layer in adapter.layers.items():
            mod = model.get_submodule(name)
            w = mod.dequantize() + layer.scale * (layer.B.float() @ layer.A.float())
            new = QuantLinear(quantize_rtn(w, bits, GROUP), getattr(mod, "bias", None))
            replace_module(model, name, new)
    return model


def linear_weights(model) -> int:
    return sum(m.in_features * m.out_features for n, m in model.named_modules()
               if isinstance(m, (QuantLinear, GWQLinear, torch.nn.Linear)) and "lm_head" not in n)


def adapter_bits(adapter) -> float:
    """Stored bits of an adapter's fp16 factors."""
    n = 0
    for layer in adapter.layers.values():
        n += layer.A.numel() + layer.B.numel()
    return 16.0 * n


def decode_ms(models: dict, tok, repeats: int = 5) -> dict:
    """ms per generated token of each model, interleaved rounds, median."""
    ids = tok("The history of the city of London begins with", return_tensors="pt").input_ids[:, :16]
    times = {k: [] for k in models}

    def one(m, n):
        t0 = time.perf_counter()
        m.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                   pad_token_id=tok.eos_token_id)
        return time.perf_counter() - t0
    with torch.no_grad():
        for m in models.values():
            one(m, 4)  # warm-up
        for _ in range(repeats):
            for k, m in models.items():
                times[k].append((one(m, 33) - one(m, 1)) / 32 * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_probe(kind: str, qdir: str, steps: int) -> None:
    """(Hidden mode) train a few steps in this fresh process; print the peak RSS of the training alone in MB
    (the kernel's high-water mark reset after loading, /proc/self/clear_refs) and the RSS of the loaded model."""
    from transformers import AutoTokenizer
    if kind == "fp32":
        model, tok = load_smollm2()
        cfg = TrainConfig(rank=RANK, alpha=ALPHA, steps=steps, batch_size=16)
    else:
        tok = AutoTokenizer.from_pretrained(qdir, local_files_only=True)
        model = load_quantized_model(qdir)
        cfg = TrainConfig(rank=RANK, alpha=ALPHA, steps=steps, batch_size=16, qalora=True)
    import gc
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    loaded = _status_mb("VmRSS")
    train_task_adapter(model, tok, get_task("add"), cfg, progress=False)
    print(json.dumps({"kind": kind, "peak_rss_mb": _status_mb("VmHWM"), "rss_after_load_mb": loaded}))


def measure_rss(qdir: Path, steps: int) -> dict:
    out = {}
    for kind in ("fp32", "quant"):
        r = subprocess.run([sys.executable, __file__, "--_rss-probe", kind, str(qdir), "--steps", str(steps)],
                           capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("{")]
        out[kind] = json.loads(line[-1]) if line else {"error": r.stderr[-500:]}
    return out


def markdown(rows, bits_list, names, rss, machine, quantizer, provenance=None) -> str:
    """The tables; ``provenance``: the JSON's record of what a --resume kept from runs on other machines
    (``kept_rows``: [{machine, tasks}], ``decode_machine``, ``rss_machine``), named under the tables."""
    idx = {(r["task"], r["base_bits"], r["method"]): r for r in rows}
    out = [f"# QA-LoRA on SmolLM2-135M ({machine['cpu']}, {machine['threads']} threads, lorakern ISA "
           f"{machine['lorakern_isa']})", ""]
    for bits in bits_list:
        out += [f"## {bits}-bit base ({quantizer.upper()}, groups of {GROUP})", "",
                "| task | " + " | ".join(m if m != "lora_fp16" else "lora_fp16 (fp32 base)" for m in METHODS)
                + " | fp32 base |",
                "|---|" + "---|" * (len(METHODS) + 1)]
        for t in names:
            cells = []
            for m in METHODS:
                r = idx.get((t, 32, m) if m == "lora_fp16" else (t, bits, m))
                cells.append("" if r is None else f"{r['metric']:.3g}")
            fp = idx.get((t, 32, "base"))
            out.append(f"| {t} | " + " | ".join(cells) + f" | {'' if fp is None else format(fp['metric'], '.3g')} |")
        bits_row = {m: next((r["avg_bits"] for r in rows if r["base_bits"] == bits and r["method"] == m), None)
                    for m in METHODS if m != "lora_fp16"}
        ms_row = {m: next((r["decode_ms"] for r in rows if r["base_bits"] == bits and r["method"] == m
                           and r["decode_ms"] is not None), None) for m in METHODS if m != "lora_fp16"}
        out += ["", "avg bits: " + ", ".join(f"{m} {v:.3f}" for m, v in bits_row.items() if v is not None),
                "decode ms/token: " + ", ".join(f"{m} {v:.2f}" for m, v in ms_row.items() if v is not None), ""]
    out.append("lora_fp16 is LoRA on the fp32 base (the same in every section); the last column is the fp32 base "
               "without adapter. Exact match: higher is better; perplexity (wikitext): lower is better.")
    if rss:
        out += ["", "Peak RSS of training (fresh process, 16-example batches): " +
                ", ".join(f"{k}: {v.get('peak_rss_mb', float('nan')):.0f} MB" for k, v in rss.items())]
    prov = provenance or {}

    def where(m):
        return f"{m['cpu']} ({m['threads']} threads, lorakern ISA {m['lorakern_isa']}, run of {m['date']})"
    for k in prov.get("kept_rows", []):
        out += ["", f"Metric rows of {', '.join(k['tasks'])}: measured on {where(k['machine'])}, kept by --resume."]
    for key, what in (("decode_machine", "Every decode time"), ("rss_machine", "The training peak RSS")):
        if prov.get(key) and not same_machine(prov[key], machine):
            out += ["", f"{what}: measured on {where(prov[key])}, kept by --resume."]
    return "\n".join(out) + "\n"


def same_machine(m1: dict, m2: dict) -> bool:
    """Same CPU model, thread count and lorakern ISA (what machine_info records; not a host identity)."""
    return all(m1.get(k) == m2.get(k) for k in ("cpu", "threads", "lorakern_isa"))


def summary(rows, bits_list) -> dict:
    """Per base: QA-LoRA merged relative to (iii) and to (ii), averaged over tasks (perplexity inverted)."""
    idx = {(r["task"], r["base_bits"], r["method"]): r for r in rows}
    out = {}
    for bits in bits_list:
        rel3, rel2, wins, ties, n, undefined = [], [], 0, 0, 0, []
        for (t, b, m), r in idx.items():
            if b != bits or m != "qalora_merged":
                continue
            r3, r2 = idx.get((t, b, "lora_unmerged")), idx.get((t, b, "lora_merged_requant"))
            hib = r["higher_is_better"]

            def ratio(x, y):  # x relative to y, 1 = equal, > 1 better; None where y (or x) is 0: undefined
                if hib:
                    return x / y if y else None
                return y / x if x else None
            if r3:
                q = ratio(r["metric"], r3["metric"])
                if q is None:
                    undefined.append(t)
                else:
                    rel3.append(q)
            if r2:
                n += 1
                better = r["metric"] > r2["metric"] if hib else r["metric"] < r2["metric"]
                wins += better
                ties += r["metric"] == r2["metric"]
        out[bits] = {"qalora_merged_vs_lora_unmerged_mean_ratio": statistics.mean(rel3) if rel3 else None,
                     "ratio_tasks": len(rel3),
                     "ratio_undefined_tasks (lora_unmerged scores 0)": sorted(undefined),
                     "qalora_merged_beats_lora_merged_requant": f"{wins} of {n} tasks ({ties} ties)"}
        ms = {m: next((r["decode_ms"] for r in rows if r["base_bits"] == bits and r["method"] == m
                       and r["decode_ms"] is not None), None) for m in ("qalora_merged", "base")}
        if ms["qalora_merged"] and ms["base"]:
            out[bits]["merged_decode_vs_base"] = ms["qalora_merged"] / ms["base"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two tasks, 4 and 2 bits, short training")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tasks", nargs="*", default=None, help=f"default: all of {suite_names()}")
    ap.add_argument("--bits", nargs="*", type=int, default=None, help="default 4 3 2 (quick: 4 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 120; quick 30)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 (quick 8)")
    ap.add_argument("--eval-examples", type=int, default=None, help="default 100 (quick 50)")
    ap.add_argument("--quantizer", choices=["rtn", "gptq"], default="rtn")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    ap.add_argument("--resume", action="store_true",
                    help="keep the JSON's complete tasks (rows, decode times, peak RSS) from a stopped run with the "
                         "same settings and run only the rest")
    ap.add_argument("--retime", action="store_true",
                    help="with --resume: measure every served form's decode time again on this machine (the kept "
                         "rows' metrics stay)")
    ap.add_argument("--decode-repeats", type=int, default=5, help="interleaved rounds of the decode timing")
    ap.add_argument("--report", action="store_true",
                    help="only rewrite the markdown table and summary from the JSON's rows (e.g. of a stopped run)")
    ap.add_argument("--_rss-probe", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.steps = a.steps or (30 if a.quick else 120)
    if a.retime and not a.resume:
        ap.error("--retime re-times a resumed run's forms: give --resume too")
    if a._rss_probe:
        rss_probe(a._rss_probe[0], a._rss_probe[1], min(a.steps, 3))
        return 0
    if a.report:
        path = a.json or f"benchmarks/results/qalora{'_quick' if a.quick else ''}.json"
        data = json.loads(Path(path).read_text())
        rows, st = data["rows"], data["settings"]
        done = [t for t in st["tasks"] if all(any(r["task"] == t and r["base_bits"] == b and r["method"] == m
                                                  for r in rows) for b in st["bits"] for m in METHODS[:-2])]
        data["summary"] = summary([r for r in rows if r["task"] in done], st["bits"])
        if not data.get("train_peak_rss") and not a.no_rss:  # a run stopped before its report: measure again
            key = f"{st['quantizer']}_g{GROUP}_r{RANK}_s{st['steps']}_b{st['batch_size']}"
            qdir = cache_dir() / "qalora_eval" / key / f"base{st['bits'][0]}"
            if (qdir / "lorakern_quantization.json").is_file():
                data["train_peak_rss"] = measure_rss(qdir, 3)
                data.setdefault("provenance", {})["rss_machine"] = machine_info()
        data["complete_tasks"] = done
        write_json(path, data)
        Path(path).with_suffix(".md").write_text(
            markdown(rows, st["bits"], st["tasks"], data.get("train_peak_rss", {}), data["machine"], st["quantizer"],
                     data.get("provenance"))
            + f"\nComplete tasks (every base and form): {', '.join(done) or 'none'}; the summary counts only them.\n"
            + "\n```\n" + json.dumps(data["summary"], indent=2) + "\n```\n")
        return 0
    a.batch_size = a.batch_size or (8 if a.quick else 16)
    a.eval_examples = a.eval_examples or (50 if a.quick else 100)
    names = a.tasks or (["add", LM_ADAPTER] if a.quick else suite_names())
    bits_list = a.bits or ([4, 2] if a.quick else [4, 3, 2])
    out_path = a.json or f"benchmarks/results/qalora{'_quick' if a.quick else ''}.json"
    torch.manual_seed(0)
    machine = machine_info()
    log(f"machine {machine}; tasks {names}; bits {bits_list}; {a.quantizer}; steps {a.steps} x {a.batch_size}")
    key = f"{a.quantizer}_g{GROUP}_r{RANK}_s{a.steps}_b{a.batch_size}"
    root = cache_dir() / "qalora_eval" / key
    fp, tok = load_smollm2()
    nweights = linear_weights(fp)
    rows = []
    decode = {}  # base_bits -> {served form: ms per token}

    def timed(bits, models):
        decode[bits] = decode_ms(models, tok, a.decode_repeats)
        log(f"{bits}-bit decode ms/token: {decode[bits]}")
        for r in rows:
            r["decode_ms"] = decode.get(r["base_bits"], {}).get(r["method"], r["decode_ms"])

    def add(task, bits, method, metric, avg_bits, **extra):
        name, hib = metric_info(task)
        rows.append({"task": task, "base_bits": bits, "method": method, "metric": metric, "metric_name": name,
                     "higher_is_better": hib, "avg_bits": round(avg_bits, 4),
                     "decode_ms": decode.get(bits, {}).get(method), **extra})
        log(f"{task} {bits}-bit {method}: {name} {metric:.4g}")
        write_json(out_path, {"machine": machine, "settings": vars(a) | {"tasks": names, "bits": bits_list},
                              "rows": rows, "train_peak_rss": rss, "provenance": prov})

    def time_fp32(ad):
        withad = copy.deepcopy(fp)
        attach_adapter(withad, ad, dtype=torch.float16)
        timed(32, {"base": fp, "lora_fp16": withad})

    def time_base(bits, qa, lo, merged, requant):
        qbase = qbases[bits]
        unq, unl = copy.deepcopy(qbase), copy.deepcopy(qbase)
        attach_adapter(unq, qa)
        attach_adapter(unl, lo, dtype=torch.float16)
        timed(bits, {"base": qbase, "qalora_merged": merged, "lora_merged_requant": requant,
                     "qalora_unmerged": unq, "lora_unmerged": unl})

    def metric(model, task):
        return evaluate_adapter_metric(model, tok, task, a.eval_examples)

    qbases = {bits: quantized_base(fp, tok, bits, a, root / f"base{bits}") for bits in bits_list}
    rss, done = None, []
    prov = {"kept_rows": [], "decode_machine": machine, "rss_machine": machine}  # where each kind of figure came from
    if a.resume and Path(out_path).is_file():
        old = json.loads(Path(out_path).read_text())
        same = ("steps", "batch_size", "eval_examples", "quantizer")
        if any(old["settings"].get(k) != getattr(a, k) for k in same):
            raise SystemExit(f"--resume: {out_path} was written with other settings "
                             f"({ {k: old['settings'].get(k) for k in same} })")
        done = [t for t in names if all(any(r["task"] == t and r["base_bits"] == b and r["method"] == m
                                            for r in old["rows"]) for b in bits_list for m in METHODS[:-2])]
        rows = [r for r in old["rows"] if r["task"] in done]
        for r in rows:
            if a.retime:
                r["decode_ms"] = None
            elif r["decode_ms"] is not None:
                decode.setdefault(r["base_bits"], {})[r["method"]] = r["decode_ms"]
        rss = old.get("train_peak_rss") or None
        # where the kept figures were measured: the stopped run's own record, else its machine
        oprov = old.get("provenance") or {}
        kept = [dict(k, tasks=[t for t in k["tasks"] if t in done]) for k in oprov.get("kept_rows", [])]
        kept = [k for k in kept if k["tasks"] and not same_machine(k["machine"], machine)]
        earlier = {t for k in kept for t in k["tasks"]}
        rest = [t for t in done if t not in earlier]
        if rest and not same_machine(old["machine"], machine):
            kept.append({"machine": old["machine"], "tasks": rest})
        prov["kept_rows"] = kept
        if decode:
            prov["decode_machine"] = oprov.get("decode_machine") or old["machine"]
        if rss is not None:
            prov["rss_machine"] = oprov.get("rss_machine") or old["machine"]
        log(f"resuming: kept {done}; decode times of bases {sorted(decode)}; peak RSS {rss}")
    if rss is None:
        rss = {} if a.no_rss else measure_rss(root / f"base{bits_list[0]}", 3)
    log(f"training peak RSS: {rss}")

    def report():  # after every task: the run can be stopped and resumed (trained adapters are cached)
        summ = summary(rows, bits_list)
        write_json(out_path, {"machine": machine, "settings": vars(a) | {"tasks": names, "bits": bits_list},
                              "rows": rows, "summary": summ, "train_peak_rss": rss, "provenance": prov})
        Path(out_path).with_suffix(".md").write_text(
            markdown(rows, bits_list, names, rss, machine, a.quantizer, prov) + "\n```\n" + json.dumps(summ, indent=2)
            + "\n```\n")
        return summ

    for t in (t for t in names if t not in done):  # task by task, every base: a stopped run leaves whole tasks
        add(t, 32, "base", metric(fp, t), 32.0)
        ad, sec = trained(fp, tok, t, a, False, root / "fp32" / t)
        with apply_adapter(fp, ad, dtype=torch.float16):
            add(t, 32, "lora_fp16", metric(fp, t), 32.0 + adapter_bits(ad) / nweights, train_seconds=sec)
        if 32 not in decode:
            time_fp32(ad)
        for bits in bits_list:
            qbase, base_bits = qbases[bits], bits + 32.0 / GROUP
            add(t, bits, "base", metric(qbase, t), base_bits)
            qa, qsec = trained(qbase, tok, t, a, True, root / f"q{bits}" / t / "qalora")
            merged = merged_qalora(qbase, qa)
            add(t, bits, "qalora_merged", metric(merged, t), base_bits, train_seconds=qsec)
            with apply_adapter(qbase, qa):
                add(t, bits, "qalora_unmerged", metric(qbase, t), base_bits + adapter_bits(qa) / nweights)
            lo, lsec = trained(qbase, tok, t, a, False, root / f"q{bits}" / t / "lora")
            requant = merged_requant(qbase, lo, bits)
            add(t, bits, "lora_merged_requant", metric(requant, t), base_bits, train_seconds=lsec)
            with apply_adapter(qbase, lo, dtype=torch.float16):
                add(t, bits, "lora_unmerged", metric(qbase, t), base_bits + adapter_bits(lo) / nweights)
            if bits not in decode:  # the served forms' speed does not depend on the task: time the first's
                time_base(bits, qa, lo, merged, requant)
        log(f"after {t}: {report()}")
    t = next((t for t in names if t in done), None)
    if a.retime and t is not None:  # bases not timed by this run's tasks: with the first complete task's adapters
        missing = [b for b in [32, *bits_list] if b not in decode]
        for bits in missing:
            if bits == 32:
                time_fp32(trained(fp, tok, t, a, False, root / "fp32" / t)[0])
                continue
            qa, _ = trained(qbases[bits], tok, t, a, True, root / f"q{bits}" / t / "qalora")
            lo, _ = trained(qbases[bits], tok, t, a, False, root / f"q{bits}" / t / "lora")
            time_base(bits, qa, lo, merged_qalora(qbases[bits], qa), merged_requant(qbases[bits], lo, bits))
        if missing:
            log(f"re-timed bases {missing} with {t}'s adapters: {report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
