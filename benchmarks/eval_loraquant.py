"""LoRAQuant on the adapter suite: every adapter's metric with the fp16 adapter, LoRAQuant
(rho in {0.8, 0.9} x high bits in {2, 3}), plain RTN of the factors at 2 and 1 bits, and
1-bit sign of every SVD component, each with its average bits per adapter parameter.

The base model is SmolLM2-135M in fp32; every adapter is applied through
lorakern.nn.LoRALinear (compressed ones through the lora_mixed kernel). Exact match on
100 held-out generated examples per task; WikiText-2 test perplexity (4 x 512 tokens)
for the language-modelling adapter. Trains the suite first if it is not cached
(benchmarks/train_adapters.py).

    python benchmarks/eval_loraquant.py [--only add,sort] [--methods fp16,rtn2] [--json PATH]
    python benchmarks/eval_loraquant.py --suite hard      # the harder tasks (issue 19): 400 examples per task,
                                                          # LoRAQuant rho {0.7,0.8,0.9,0.95} x b_hi {2,3} with the
                                                          # paper's scales, rho {0.5,...,0.95} x b_hi {2,3} unbiased,
                                                          # RTN at 1/2/3 bits and groups 32/128, sign (both), fp16;
                                                          # PNG plot

    python benchmarks/eval_loraquant.py --suite hard --methods M1,M2 --merge   # run M1, M2 and keep the JSON's
                                                          # other rows (every row names its run: "run", "runs")

Method names: ``fp16``; ``loraquant_rho{R}_hi{B}`` (the paper's scales; optionally ``_refined``: 300 steps of its
data-free refinement) and ``loraquant_rho{R}_hi{B}_unbiased`` (lorakern's default: every component unbiased along
itself, :func:`lorakern.quant.unbias_components`); ``rtn{B}`` or ``rtn{B}_g{G}`` (plain RTN of the factors, group G,
default 128); ``sign`` / ``sign_unbiased`` (1-bit sign of every SVD component).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from common import machine_info

from lorakern.adapters import apply_adapter, load_peft_adapter
from lorakern.models.smollm2 import load_smollm2
from lorakern.quant import compress_lora, rtn_lora
from lorakern.apps.train.suite import adapter_dir, ensure_suite, evaluate_adapter_metric, metric_info, suite_names

METHODS = ["fp16", "loraquant_rho0.8_hi2", "loraquant_rho0.9_hi2", "loraquant_rho0.8_hi3", "loraquant_rho0.9_hi3",
           "rtn3", "rtn2", "rtn1", "sign"]
HARD_METHODS = ["fp16", *[f"loraquant_rho{r}_hi{b}" for b in (2, 3) for r in (0.7, 0.8, 0.9, 0.95)],
                *[f"rtn{b}_g{g}" for b in (3, 2, 1) for g in (128, 32)], "sign",
                *[f"loraquant_rho{r}_hi{b}_unbiased" for b in (2, 3) for r in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)],
                "sign_unbiased"]


def build(method: str, adapter):
    """(layers to attach, average bits per adapter parameter) for one method."""
    if method == "fp16":
        return adapter, 16.0
    layers = {}
    for name, l in adapter.layers.items():
        if method.startswith("loraquant"):  # loraquant_rho0.9_hi2[_refined][_unbiased]
            rho = float(method.split("_rho")[1].split("_")[0])
            hi = int(method.split("_hi")[1].split("_")[0])
            steps = 300 if "_refined" in method else 0
            layers[name] = compress_lora(l.B, l.A, rho=rho, bits_high=hi, scale=l.scale, refine_steps=steps,
                                         unbias=method.endswith("_unbiased"))
        elif method.startswith("rtn"):  # rtn2 or rtn2_g32
            bits, _, g = method[3:].partition("_g")
            layers[name] = rtn_lora(l.B, l.A, int(bits), group_size=int(g or 128), scale=l.scale)
        elif method in ("sign", "sign_unbiased"):
            layers[name] = compress_lora(l.B, l.A, h=0, scale=l.scale, unbias=method == "sign_unbiased")
        else:
            raise ValueError(f"unknown method {method!r}")
    params = sum(c.rank * sum(c.shape) for c in layers.values())
    bits = sum(c.bits_per_param() * c.rank * sum(c.shape) for c in layers.values()) / params
    return layers, bits


def retention(metric: float, fp16: float, higher: bool) -> float:
    """The method's metric as a fraction of the fp16 adapter's (perplexity: fp16 / method)."""
    return metric / fp16 if higher else fp16 / metric


def binomial_halfwidth(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of an exact-match rate p on n examples."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n)


def plot(summary: dict, rows: list, path: Path, title: str) -> None:
    """Average bits per adapter parameter against mean retention, one marker per method family."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1, 1.3]})
    fams = [("LoRAQuant, paper's scales", "o", lambda m: m.startswith("loraquant") and not m.endswith("_unbiased")),
            ("LoRAQuant, unbiased (lorakern)", "D", lambda m: m.startswith("loraquant") and m.endswith("_unbiased")),
            ("RTN", "s", lambda m: m.startswith("rtn")), ("sign", "x", lambda m: m == "sign"),
            ("sign, unbiased", "+", lambda m: m == "sign_unbiased"), ("fp16", "*", lambda m: m == "fp16")]
    pts = {m: (summary[m]["avg_bits"], 100 * summary[m]["retention"]) for m in summary}
    # the Pareto front over every method: no other has fewer (or equal) bits and more retained
    front = sorted((pts[m] for m in pts if not any(o != m and pts[o][0] <= pts[m][0] and pts[o][1] > pts[m][1]
                                                   for o in pts)))
    lo_bits, hi_bits = 1.3, 2.5  # the zoom: the range the goal names
    for a_ in (ax, zoom):
        for label, marker, member in fams:
            ms = [m for m in summary if member(m)]
            if a_ is zoom:
                ms = [m for m in ms if lo_bits <= pts[m][0] <= hi_bits]
            if not ms:
                continue
            a_.scatter([pts[m][0] for m in ms], [pts[m][1] for m in ms], marker=marker, s=50, label=label)
            for m in ms:
                short = m.replace("loraquant_", "").replace("_hi", " hi").replace("_unbiased", "")
                a_.annotate(short, pts[m], fontsize=6 if a_ is ax else 7, xytext=(3, 3), textcoords="offset points")
        a_.plot(*zip(*front), color="black", lw=0.8, alpha=0.6, label="Pareto front (all methods)")
        a_.axhline(95, color="grey", ls="--", lw=0.8)
        a_.axvline(2, color="grey", ls=":", lw=0.8)
        a_.grid(True, alpha=0.3)
        a_.set_xlabel("average bits per adapter parameter (codes + fp16 scales and zeros)")
    ax.set_xscale("log", base=2)
    ax.set_ylabel("metric retained vs the fp16 adapter, mean over tasks (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    zoom.set_xlim(lo_bits, hi_bits)
    zoom_y = [pts[m][1] for m in pts if lo_bits <= pts[m][0] <= hi_bits and m.startswith("loraquant")]
    bottom = max(min(zoom_y) - 3, 0) if zoom_y else 80
    zoom.set_ylim(bottom, 101.5)
    zoom.set_title(f"zoom: {lo_bits}-{hi_bits} bits, LoRAQuant's range (points below {bottom:.0f}% left out)",
                   fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def markdown(rows, summary, examples: int = 100, runs: dict | None = None, seed: int = 12345) -> str:
    """One row per method (base first), one column per adapter, then average bits and mean retention."""
    adapters = list(dict.fromkeys(r["adapter"] for r in rows))
    methods = list(dict.fromkeys(["base", *[r["method"] for r in rows]]))  # in the order they ran
    by = {(r["adapter"], r["method"]): r for r in rows}
    out = ["# LoRAQuant on the adapter suite (SmolLM2-135M)", "",
           f"Metric per adapter (exact match on {examples} held-out examples"
           f"{'' if seed == 12345 else f' drawn with seed {seed}'}; `wikitext`: WikiText-2 test perplexity, "
           "lower is better) and average bits per adapter parameter (codes + fp16 scales and zeros); retention is the "
           "metric over the fp16 adapter's (perplexity: the inverse), averaged over adapters. "
           "Generated by `benchmarks/eval_loraquant.py`.", "",
           "| method | " + " | ".join(adapters) + " | avg bits | retention vs fp16 |",
           "|---|" + "---|" * (len(adapters) + 2)]
    for m in methods:
        cells = [f"{by[(a, m)]['metric']:.3f}" if (a, m) in by else "" for a in adapters]
        bits = f"{summary[m]['avg_bits']:.2f}" if m in summary else "-"
        ret = f"{100 * summary[m]['retention']:.1f}%" if m in summary else "-"
        out.append(f"| {m} | " + " | ".join(cells) + f" | {bits} | {ret} |")
    em = [r["metric"] for r in rows if r["method"] == "fp16" and r["metric_name"] == "exact_match"]
    if em:
        worst = max(binomial_halfwidth(p, examples) for p in em)
        out += ["", f"95% binomial interval of one exact-match cell: ±1.96·sqrt(p(1-p)/n), at most "
                    f"±{100 * worst:.1f} points here (n = {examples}); every method is scored on the same examples, "
                    "so differences between methods vary less than that."]
    labels = list(dict.fromkeys(r.get("run") for r in rows if r.get("run") and r["method"] != "base"))
    if len(labels) > 1:  # rows from earlier runs (--merge): say which, per run
        all_adapters = set(adapters)
        notes = []
        for label in sorted(labels)[:-1]:  # every run but the latest ("YYYY-MM-DD HH:MM:SS" sorts by time)
            by_method = {}
            for r in rows:
                if r.get("run") == label and r["method"] != "base":
                    by_method.setdefault(r["method"], []).append(r["adapter"])
            parts = [m if set(a) >= all_adapters else f"{m} ({', '.join(a)})" for m, a in by_method.items()]
            mach = (runs or {}).get(label, {})
            notes.append(f"{', '.join(parts)} (run of {label}, {mach.get('cpu', '?')}, {mach.get('lorakern_isa', '?')})")
        out += ["", "Rows from earlier runs of this script (`--merge`, same adapters and examples): " + "; ".join(notes)
                + "."]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated adapters (default: the suite)")
    ap.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (a LoRAQuant name may end in "
                                      "_refined: the data-free refinement, 300 steps)")
    ap.add_argument("--suite", choices=["default", "hard"], default="default",
                    help="hard: the harder task variants (HARD_SUITE), 400 examples, the wider method grid")
    ap.add_argument("--examples", type=int, default=None, help="held-out examples per task (default 100; hard 400)")
    ap.add_argument("--eval-seed", type=int, default=12345,
                    help="seed of the held-out examples (default the suite's 12345; another one checks choices made "
                         "on those on fresh examples)")
    ap.add_argument("--json", default=None, help="default benchmarks/results/loraquant_suite[_hard][_seedS].json")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from an existing --json file")
    ap.add_argument("--merge", action="store_true",
                    help="keep --json's rows for the methods and adapters not run now (each row names its run; the "
                         "runs' machines are under \"runs\")")
    args = ap.parse_args(argv)
    hard = args.suite == "hard"
    args.examples = args.examples or (400 if hard else 100)
    seed_tag = "" if args.eval_seed == 12345 else f"_seed{args.eval_seed}"
    args.json = args.json or str(Path(__file__).parent / "results" /
                                 f"loraquant_suite{'_hard' if hard else ''}{seed_tag}.json")
    if args.markdown_only:
        d = json.loads(Path(args.json).read_text())
        md = markdown(d["rows"], d["summary"], d.get("examples", 100), d.get("runs"), d.get("eval_seed", 12345))
        Path(args.json).with_suffix(".md").write_text(md)
        plot(d["summary"], d["rows"], Path(args.json).with_suffix(".png"),
             f"LoRAQuant on the {'harder ' if hard else ''}adapter suite (SmolLM2-135M, {d.get('examples', 100)} "
             "examples per task)")
        print(md)
        return
    names = args.only.split(",") if args.only else suite_names(hard)
    methods = args.methods.split(",") if args.methods else (HARD_METHODS if hard else METHODS)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    ensure_suite(model, tok, names)
    rows, t0 = [], time.perf_counter()
    machine = machine_info()
    run, runs, kept = machine["date"], {machine["date"]: machine}, []
    if args.merge and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        if (old.get("examples"), old.get("eval_seed", 12345)) != (args.examples, args.eval_seed):
            raise SystemExit(f"--merge: {args.json} has {old.get('examples')} examples per task (seed "
                             f"{old.get('eval_seed', 12345)}), this run {args.examples} (seed {args.eval_seed})")
        kept = [dict(r) for r in old["rows"] if r["adapter"] not in names or r["method"] not in [*methods, "base"]]
        runs.update(old.get("runs") or {old["machine"]["date"]: old["machine"]})
        for r in kept:  # a file from before rows named their run: all of it is that file's run
            r.setdefault("run", old["machine"]["date"])
    for name in names:
        adapter = load_peft_adapter(adapter_dir(name))
        metric_name, higher = metric_info(name)
        base = evaluate_adapter_metric(model, tok, name, args.examples, seed=args.eval_seed)
        rows.append(dict(adapter=name, method="base", avg_bits=0.0, metric=base, metric_name=metric_name,
                         higher_is_better=higher))
        for method in methods:
            layers, bits = build(method, adapter)
            with apply_adapter(model, layers, dtype=torch.float16):
                m = evaluate_adapter_metric(model, tok, name, args.examples, seed=args.eval_seed)
            rows.append(dict(adapter=name, method=method, avg_bits=round(bits, 4), metric=m, metric_name=metric_name,
                             higher_is_better=higher))
            print(f"{name:9s} {method:22s} bits {bits:6.3f}  {metric_name} {m:.4f}   ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    for r in rows:
        r["run"] = run
    rows = kept + rows  # the kept rows first, so that the table keeps the earlier order
    runs = {k: v for k, v in runs.items() if any(r["run"] == k for r in rows)}
    summary = {}
    for method in {r["method"] for r in rows} - {"base"}:
        rs = [r for r in rows if r["method"] == method]
        fp = {r["adapter"]: r["metric"] for r in rows if r["method"] == "fp16"}
        ret = [retention(r["metric"], fp[r["adapter"]], r["higher_is_better"]) for r in rs if fp.get(r["adapter"])]
        summary[method] = {"avg_bits": sum(r["avg_bits"] for r in rs) / len(rs),
                           "retention": sum(ret) / len(ret) if ret else float("nan")}
    out = {"machine": machine, "model": "SmolLM2-135M-Instruct (fp32 base)", "examples": args.examples,
           "eval_seed": args.eval_seed,
           "rows": rows, "summary": summary, "runs": runs,
           "retention_note": "metric / fp16 metric (perplexity: fp16 / metric), averaged over adapters"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    md = markdown(rows, summary, args.examples, runs, args.eval_seed)
    Path(args.json).with_suffix(".md").write_text(md)
    plot(summary, rows, Path(args.json).with_suffix(".png"),
         f"LoRAQuant on the {'harder ' if hard else ''}adapter suite (SmolLM2-135M, {args.examples} examples per task)")
    print(md)
    print(f"wrote {args.json} and {Path(args.json).with_suffix('.md')}")


if __name__ == "__main__":
    main()
