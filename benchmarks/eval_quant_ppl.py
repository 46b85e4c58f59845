"""WikiText-2 perplexity of a built-in model quantized by every method, at 4 and 3 bits and groups 128/64/32.

    python benchmarks/eval_quant_ppl.py [--model smollm2|gemma3] [--quick] [--json PATH] [--bits 4 3]
                                        [--windows 8] [--calib 8] [--rows all|main] [--merge] [--markdown-only]

Methods (quantize_model's; the output head and its tied embedding are kept in full precision in every row):
  rtn, gptq, awq            dense only (awq: activation-aware scales folded into the norms, clipping search, RTN)
  awq_gptq                  AWQ's scales, then GPTQ
  gwq                       1% gradient outliers |g|, GPTQ dense part (GWQ)
  gwq_awq                   1% gradient outliers |g|, AWQ dense part
  gwq_rtn                   1% gradient outliers |g|, RTN dense part
  spqr                      1% Hessian outliers w^2/[H^-1]_kk, GPTQ dense part (SpQR-style)
  magnitude, random         1% |w| or random outliers, GPTQ dense part
Every method at group 128; the dense methods (rtn, gptq, awq) also at 64 and 32, which bracket the bits of the
outliers. A layer whose in_features is not a multiple of the group uses the largest of 64/32 that divides it
(SmolLM2's 576-wide layers take 64 at group 128).

Calibration: the first --calib windows of 512 tokens of valid.txt, statistics (gradients, squared gradients,
Hessians, activation means) collected once and shared by every row. Evaluation: the first --windows windows of
512 tokens of test.txt (each window starts with BOS when the tokenizer adds one: Gemma). Average bits count
codes, fp16 scales and zeros, and outliers (value, column, row pointers) over the quantized layers.

Writes benchmarks/results/quant_ppl_{model}.json, .md and .png (--quick: *_quick.*): rows
{"method", "bits", "group_size", "avg_bits", "ppl", ...}; the plot puts average bits against perplexity, one
marker per method, with the Pareto front drawn. --merge keeps the rows of an existing results file that this
run does not redo (same settings required).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> quantize_model keyword arguments
METHODS = {
    "rtn": dict(method="rtn"),
    "gptq": dict(method="gptq"),
    "awq": dict(method="awq"),
    "awq_gptq": dict(method="awq", dense="awq_gptq"),
    "gwq": dict(method="gwq"),
    "gwq_awq": dict(method="gwq_awq"),
    "gwq_rtn": dict(method="gwq", dense="rtn"),
    "spqr": dict(method="spqr"),
    "magnitude": dict(method="magnitude"),
    "random": dict(method="random"),
}
DENSE = ("rtn", "gptq", "awq")
# (method, group size) rows of a full run, per bit width
ROWS = [(m, 128) for m in METHODS] + [(m, g) for g in (64, 32) for m in DENSE]
QUICK_ROWS = [("rtn", 128), ("gptq", 128), ("awq", 128), ("gwq", 128), ("gwq_awq", 128)]
MARKERS = {"rtn": "o", "gptq": "s", "awq": "^", "awq_gptq": "v", "gwq": "*", "gwq_awq": "P", "gwq_rtn": "X",
           "spqr": "D", "magnitude": "h", "random": "x"}


def on_source_grid(model: str, bits: int, group: int) -> bool:
    """SmolLM2's fp32 weights are a dequantized Q4_1 model (4-bit codes, a scale and a minimum per 32): 4-bit
    group-32 asymmetric quantization can reproduce them, so such rows are (near-)lossless by construction."""
    return model == "smollm2" and bits == 4 and group == 32


def write_markdown(path, res):
    lines = [f"# Quantized {res['title']}: WikiText-2 perplexity\n",
             f"Test: first {res['windows']} windows of {res['window']} tokens of test.txt"
             + (" (each starting with BOS)" if res.get("bos_windows") else "") + ". "
             f"Calibration: first {res['calib']} windows of valid.txt (statistics {res['statistics_seconds']:.0f} s, "
             f"shared). Outliers: {res['outliers']:.0%} per matrix. Output head and tied embedding kept in full "
             f"precision; average bits over the quantized layers, all metadata counted. Machine: "
             f"{res['machine']['cpu']}, {res['machine']['threads']} threads, {res['machine']['date']}.\n",
             f"Baseline ({res['rows'][0]['method']}): {res['baseline']}.\n"]
    if res["model"] == "smollm2":
        lines.append("Rows marked * are lossless by construction, not evidence: the baseline is a dequantized Q4_1 "
                     "model, whose grid 4-bit group-32 asymmetric quantization can reproduce.\n")
    lines += ["| method | bits | group | avg bits | ppl | quantize s |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        mark = " *" if r.get("on_source_grid") else ""
        lines.append(f"| {r['method']}{mark} | {r['bits']} | {r.get('group_size') or '-'} | {r['avg_bits']:.3f} | "
                     f"{r['ppl']:.3f} | {r.get('seconds', 0):.0f} |")
    front = pareto(res["rows"][1:])
    lines += ["", "Pareto front (no other row has fewer or equal average bits and lower perplexity): "
              + ", ".join(f"{r['method']} {r['bits']}-bit g{r['group_size']} ({r['avg_bits']:.2f} bits, "
                          f"{r['ppl']:.2f})" for r in front) + "."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def pareto(rows):
    """Rows not dominated in (avg_bits, ppl), by increasing bits."""
    out = [r for r in rows if not any(o is not r and o["avg_bits"] <= r["avg_bits"] and o["ppl"] < r["ppl"]
                                      for o in rows)]
    return sorted(out, key=lambda r: r["avg_bits"])


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    rows = res["rows"][1:]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == m]
        ax.scatter([r["avg_bits"] for r in pts], [r["ppl"] for r in pts], marker=MARKERS.get(m, "o"), s=55,
                   label=m, alpha=0.85)
    front = pareto(rows)
    ax.step([r["avg_bits"] for r in front], [r["ppl"] for r in front], where="post", color="k", lw=0.8,
            alpha=0.6, label="Pareto front")
    ax.axhline(res["rows"][0]["ppl"], color="grey", ls="--", lw=0.8, label=f"baseline ({res['rows'][0]['ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per weight (codes + scales + zeros + outliers)")
    ax.set_ylabel(f"WikiText-2 perplexity ({res['windows']} x {res['window']} tokens)")
    ax.set_title(f"{res['title']}: quantization methods at 4 and 3 bits, groups 128/64/32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> int:
    from lorakern.models.builtin import BUILTIN_MODELS, builtin_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(BUILTIN_MODELS))
    ap.add_argument("--quick", action="store_true", help="4 test windows, 2 calibration windows, 5 rows per bits")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--windows", type=int, default=None, help="test windows (default 8, quick 4)")
    ap.add_argument("--calib", type=int, default=None, help="calibration windows (default 8, quick 2)")
    ap.add_argument("--outliers", type=float, default=0.01)
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), help="only these methods")
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", action="store_true", help="add to / replace rows in an existing results file")
    ap.add_argument("--resume", action="store_true", help="keep the rows a killed run with the same settings "
                    "finished (the .partial.json beside the results)")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md table and plot from the JSON")
    a = ap.parse_args(argv)

    spec = builtin_model(a.model)
    suffix = "_quick" if a.quick else ""
    out_json = a.json or os.path.join(HERE, "results", f"quant_ppl_{spec.name}{suffix}.json")
    stem = os.path.splitext(out_json)[0]
    if a.markdown_only:
        with open(out_json) as f:
            res = json.load(f)
        write_markdown(stem + ".md", res)
        plot(res, stem + ".png")
        return 0

    import lorakern
    from common import machine_info
    from lorakern.apps.evaluation import perplexity, read_wikitext, token_windows
    from lorakern.models import load_builtin
    from lorakern.quant import calibration_windows, collect_statistics

    n_test = a.windows or (4 if a.quick else 8)
    n_cal = a.calib or (2 if a.quick else 8)
    plan = QUICK_ROWS if a.quick else ROWS
    if a.methods:
        plan = [(m, g) for m, g in ROWS if m in a.methods]
    torch.manual_seed(0)
    model, tok = load_builtin(spec.name)
    test = token_windows(tok, read_wikitext("test"), 512, n_test)
    cal = calibration_windows(tok, n_cal, 512)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    t0 = time.time()
    stats = collect_statistics(model, cal, names, gradients=True, grad_squares=True, hessians=True, act_means=True)
    t_stats = time.time() - t0
    print(f"{spec.title}: calibration statistics ({n_cal} x 512 tokens): {t_stats:.0f} s", flush=True)
    base = f"fp32 ({spec.baseline.split(' (')[0]})"
    rows = [{"method": base, "bits": 32, "group_size": None, "avg_bits": 32.0,
             "ppl": perplexity(model, test, desc="ppl fp32")}]
    print(f"{'method':10} {'bits':>4} {'group':>5} {'avg bits':>8} {'ppl':>10} {'quant s':>8}")
    print(f"{'fp32':10} {32:>4} {'-':>5} {32.0:>8.3f} {rows[0]['ppl']:>10.3f}", flush=True)
    res = {"model": spec.name, "title": spec.title, "baseline": spec.baseline, "windows": n_test, "window": 512,
           "bos_windows": bool(tok.bos_token_id is not None and (test[:, 0] == tok.bos_token_id).all()),
           "calib": n_cal, "outliers": a.outliers, "head": "full precision (kept)", "statistics_seconds": t_stats,
           "machine": machine_info(), "rows": rows}
    os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
    partial = stem + ".partial.json"  # every finished row, so that a killed run can go on with --resume
    done = {}
    if a.resume and os.path.exists(partial):
        with open(partial) as f:
            old = json.load(f)
        if (old["windows"], old["calib"], old["outliers"]) == (n_test, n_cal, a.outliers):
            done = {(r["method"], r["bits"], r["group_size"]): r for r in old["rows"][1:]}
            print(f"--resume: {len(done)} rows from {partial}", flush=True)
    for bits in a.bits:
        for name, group in plan:
            if (name, bits, group) in done:
                rows.append(done[(name, bits, group)])
                continue
            kw = dict(METHODS[name])
            qm = lorakern.quantize_model(copy.deepcopy(model), bits=bits, group_size=group, outliers=a.outliers,
                                         statistics=stats, head_bits=None, progress=False, **kw)
            rec = qm.lorakern_quantization
            ppl = perplexity(qm, test, desc=f"ppl {name} {bits}")
            row = {"method": name, "bits": bits, "group_size": group, "avg_bits": rec["avg_bits"], "ppl": ppl,
                   "seconds": rec["seconds"], "score": rec["score"], "dense": rec["dense"],
                   "layer_groups": sorted(set(rec["layers"].values()))}
            if on_source_grid(spec.name, bits, group):
                row["on_source_grid"] = True
            if "awq" in rec:
                al = [v["alpha"] for v in rec["awq"].values() if "alpha" in v]
                row["awq_alpha_mean"] = sum(al) / max(len(al), 1)
            rows.append(row)
            print(f"{name:10} {bits:>4} {group:>5} {rec['avg_bits']:>8.3f} {ppl:>10.3f} {rec['seconds']:>8.1f}",
                  flush=True)
            del qm
            gc.collect()  # a quantized copy sits in reference cycles: without this, Gemma's 1.1 GB copies pile up
            with open(partial, "w") as f:
                json.dump(res, f, indent=1)
    if a.merge and os.path.exists(out_json):
        with open(out_json) as f:
            old = json.load(f)
        if (old.get("model"), old["windows"], old["calib"], old["outliers"]) != (spec.name, n_test, n_cal, a.outliers):
            raise SystemExit(f"--merge: {out_json} was made with other settings")
        redone = {(r["method"], r["bits"], r.get("group_size")) for r in rows}
        rows[1:1] = [r for r in old["rows"][1:] if (r["method"], r["bits"], r.get("group_size")) not in redone]
        order = {k: i for i, k in enumerate(ROWS)}
        rows[1:] = sorted(rows[1:], key=lambda r: (-r["bits"], order.get((r["method"], r.get("group_size")), 99)))
    os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
    if os.path.exists(partial):
        os.remove(partial)
    with open(out_json, "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(stem + ".md", res)
    plot(res, stem + ".png")
    print(f"wrote {out_json} ({time.time() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
