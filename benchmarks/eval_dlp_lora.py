"""DLP-LoRA on SmolLM2-135M and the adapter suite's six task adapters: routing, fused quality, speed.

    python benchmarks/eval_dlp_lora.py [--quick] [--json PATH]

1. The router (lorakern.apps.dlp.DLPRouter: the base model's mean-pooled input embeddings -> a small MLP) is
   trained on prompts of the six tasks drawn with training seeds (200 per task; --quick 60).
2. Held-out prompts (exact_match's evaluation seed, 100 per task; --quick 30): routing top-1 accuracy and
   whether the task's own adapter is among the kept ones (top-p 0.6). Every suite prompt starts with its
   task's own instruction line, which makes routing easy; a second router trained and evaluated on the
   prompts without that line (input only) shows how it does when the prompt must speak for itself.
3. Per task, greedy exact match with: DLP fusion (adapter_names="auto": each prompt's kept adapters as its
   mixture, for prefill and every decode step), the oracle adapter, a uniform merge of all six (weights 1/6,
   the same mixture path), the base model; and DLP fusion over LoRAQuant-compressed copies of the adapters
   (rho 0.9, 2-bit high part).
4. A mixed batch of 64 prompts from all six tasks (round robin): exact match with DLP fusion and with the
   oracle; time of prefill + 32 decode tokens (min_new_tokens = max_new_tokens = 32) with DLP fusion (router
   included) against the same batch all on one adapter; medians of repeats, alternated.

Writes benchmarks/results/dlp_lora.json (rows + summary: routing_kept_accuracy, fusion_vs_oracle,
fusion_vs_uniform, mixed_batch_time_ratio) and dlp_lora.md (quick: dlp_lora_quick.*).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from common import machine_info

import lorakern
from lorakern.adapters import compress_adapter, load_peft_adapter
from lorakern.apps.dlp import FixedMixture, attach_router, prompt_batches, train_router
from lorakern.models.smollm2 import load_smollm2
from lorakern.apps.train import exact_match, get_task
from lorakern.apps.train.suite import adapter_dir, ensure_suite
from lorakern.apps.train.tasks import SUITE

ROUTER_SEED, EVAL_SEED = 777_000, 12345  # training prompts / exact_match's held-out seed


def pairs_for(task, n, seed):
    return task.examples(n, seed)


@torch.no_grad()
def mixed_exact_match(model, tok, items, adapter_names):
    """items: [(task, x, y)]; one generate over the whole batch; returns per-item correctness."""
    nl = tok("\n", add_special_tokens=False).input_ids[-1]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [tok(t.prompt(x), add_special_tokens=False).input_ids for t, x, _ in items]
    L = max(map(len, prompts))
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    max_new = max(len(tok(f" {y}\n", add_special_tokens=False).input_ids) for _, _, y in items) + 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                         pad_token_id=pad, eos_token_id=nl, adapter_names=adapter_names)
    return [tok.decode(g, skip_special_tokens=True).split("\n")[0].strip() == y
            for (_, _, y), g in zip(items, out[:, L:].tolist())]


@torch.no_grad()
def time_generate(model, tok, items, adapter_names, new_tokens):
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [tok(t.prompt(x), add_special_tokens=False).input_ids for t, x, _ in items]
    L = max(map(len, prompts))
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=pad, adapter_names=adapter_names)
    return time.perf_counter() - t0


def markdown(payload) -> str:
    s = payload["summary"]
    lines = [f"# DLP-LoRA on SmolLM2-135M ({payload['machine']['cpu']}, {payload['machine']['threads']} threads, "
             f"{payload['machine']['lorakern_isa']}; {payload['mode']})", "",
             f"Router: {payload['router']['parameters']:,} parameters, trained on {payload['router']['prompts']} "
             f"prompts in {payload['router']['train_seconds']:.1f} s; top-p {payload['router']['top_p']}.", "",
             "| task | routed top-1 | kept | kept, input only | DLP fusion | DLP (compressed) | oracle | uniform merge | base |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in payload["rows"]:
        by.setdefault(r["task"], {})[r["method"]] = r
    for t, d in by.items():
        if t == "mixed64":
            continue
        lines.append(f"| {t} | {d['routing']['top1']:.2f} | {d['routing']['kept']:.2f} | "
                     f"{d['routing_input_only']['kept']:.2f} | {d['dlp']['metric']:.2f} | "
                     f"{d['dlp_compressed']['metric']:.2f} | {d['oracle']['metric']:.2f} | "
                     f"{d['uniform']['metric']:.2f} | {d['base']['metric']:.2f} |")
    m = by["mixed64"]
    lines += ["", f"Mixed batch of 64 prompts (all six tasks): exact match DLP {m['dlp']['metric']:.3f}, oracle "
              f"{m['oracle']['metric']:.3f}; prefill + {payload['new_tokens']} tokens: DLP "
              f"{m['dlp_time']['median_s']:.2f} s vs one adapter {m['one_adapter_time']['median_s']:.2f} s "
              f"(medians of {m['dlp_time']['repeats']}).", "",
              "| summary | value | goal |", "|---|---|---|",
              f"| routing_kept_accuracy | {s['routing_kept_accuracy']:.3f} | >= 0.98 |",
              f"| routing_top1_accuracy | {s['routing_top1_accuracy']:.3f} | |",
              f"| routing_kept_accuracy, prompts without the instruction line | "
              f"{s['routing_kept_accuracy_input_only']:.3f} | (harder reading, no goal) |",
              f"| fusion_vs_oracle (mixed batch) | {s['fusion_vs_oracle']:.3f} | >= 0.97 |",
              f"| fusion_vs_uniform (per-task means) | {s['fusion_vs_uniform']:.3f} | > 1 |",
              f"| mixed_batch_time_ratio | {s['mixed_batch_time_ratio']:.3f} | <= 1.2 |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts and repeats")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tasks", default=None, help="comma-separated suite tasks (default: all six)")
    args = ap.parse_args(argv)
    quick = args.quick
    n_train, n_eval, repeats, new_tokens = (60, 30, 2, 32) if quick else (200, 100, 3, 32)
    res = Path(__file__).parent / "results"
    json_path = Path(args.json) if args.json else res / ("dlp_lora_quick.json" if quick else "dlp_lora.json")
    torch.manual_seed(0)
    model, tok = load_smollm2()
    tasks = args.tasks.split(",") if args.tasks else list(SUITE)
    unknown = [t for t in tasks if t not in SUITE]
    if unknown or len(tasks) < 2:
        ap.error(f"--tasks: at least two of {list(SUITE)}, got {tasks}")
    print(f"adapters: {tasks} (trained and cached on first use)", flush=True)
    ensure_suite(model, tok, tasks)

    t0 = time.perf_counter()
    train_prompts = {t: [get_task(t).prompt(x) for x, _ in pairs_for(get_task(t), n_train, ROUTER_SEED)] for t in tasks}
    router = train_router(model, tok, train_prompts, add_special_tokens=False)  # as exact_match encodes
    train_s = time.perf_counter() - t0
    print(f"router: {router.num_parameters():,} parameters, {train_s:.1f} s, train accuracy "
          f"{router.record['train_accuracy']:.3f}", flush=True)

    rows = []
    kept_all, top1_all = [], []
    for t in tasks:
        prompts = [get_task(t).prompt(x) for x, _ in pairs_for(get_task(t), n_eval, EVAL_SEED)]
        top1 = kept = 0
        for ids, mask in prompt_batches(tok, prompts, add_special_tokens=False):
            names, _ = router.route(model, ids, mask)
            top1 += sum(row[0] == t for row in names)
            kept += sum(t in row for row in names)
        rows.append({"task": t, "method": "routing", "top1": top1 / n_eval, "kept": kept / n_eval, "n": n_eval})
        top1_all.append(top1 / n_eval)
        kept_all.append(kept / n_eval)
        print(f"  routing {t}: top-1 {top1 / n_eval:.3f}, kept {kept / n_eval:.3f}", flush=True)

    # a harder reading: the same router design on prompts without the instruction line (input only), where
    # reverse and caesar3 (both letter lists) look alike; routing accuracy only, reported beside the real one
    def bare(task, x):
        return get_task(task).prompt(x).split("\n", 1)[1]
    bare_router = train_router(model, tok, {t: [bare(t, x) for x, _ in pairs_for(get_task(t), n_train, ROUTER_SEED)]
                                            for t in tasks}, add_special_tokens=False, progress=False)
    bare_kept = []
    for t in tasks:
        prompts = [bare(t, x) for x, _ in pairs_for(get_task(t), n_eval, EVAL_SEED)]
        top1 = kept = 0
        for ids, mask in prompt_batches(tok, prompts, add_special_tokens=False):
            names, _ = bare_router.route(model, ids, mask)
            top1 += sum(row[0] == t for row in names)
            kept += sum(t in row for row in names)
        rows.append({"task": t, "method": "routing_input_only", "top1": top1 / n_eval, "kept": kept / n_eval,
                     "n": n_eval})
        bare_kept.append(kept / n_eval)
        print(f"  routing without the instruction line {t}: top-1 {top1 / n_eval:.3f}, kept {kept / n_eval:.3f}",
              flush=True)

    bank = lorakern.attach_adapters(model, {t: adapter_dir(t) for t in tasks}, dtype=torch.float16)
    comp = {f"{t}_q": compress_adapter(load_peft_adapter(adapter_dir(t)), rho=0.9, bits_high=2) for t in tasks}
    for name, layers in comp.items():
        bank.add(name, layers)
    comp_router = type(router)([f"{n}_q" for n in router.names], router.in_dim, router.hidden, router.top_p)
    comp_router.load_state_dict(router.state_dict())
    uniform = FixedMixture(tasks)

    def metric(task, names):
        return exact_match(model, tok, get_task(task), n=n_eval, seed=EVAL_SEED, adapter_names=names)

    for t in tasks:
        attach_router(model, router)
        r = {"dlp": metric(t, "auto"), "oracle": metric(t, t), "base": metric(t, None)}
        attach_router(model, comp_router)
        r["dlp_compressed"] = metric(t, "auto")
        attach_router(model, uniform)
        r["uniform"] = metric(t, "auto")
        for method, v in r.items():
            rows.append({"task": t, "method": method, "metric": v, "metric_name": "exact_match", "n": n_eval})
        print(f"  {t}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)

    # the mixed batch: 64 prompts, round robin over the tasks
    items = []
    for i in range(64):
        t = get_task(tasks[i % len(tasks)])
        x, y = t.examples(1, 50_000 + i)[0]
        items.append((t, x, y))
    attach_router(model, router)
    dlp_ok = mixed_exact_match(model, tok, items, "auto")
    oracle_ok = mixed_exact_match(model, tok, items, [t.name for t, _, _ in items])
    rows.append({"task": "mixed64", "method": "dlp", "metric": sum(dlp_ok) / 64, "metric_name": "exact_match", "n": 64})
    rows.append({"task": "mixed64", "method": "oracle", "metric": sum(oracle_ok) / 64, "metric_name": "exact_match",
                 "n": 64})
    one = [tasks[0]] * 64
    time_generate(model, tok, items[:8], "auto", 4)  # warm-up
    t_dlp, t_one = [], []
    for _ in range(repeats):  # alternated, so drift hits both
        t_dlp.append(time_generate(model, tok, items, "auto", new_tokens))
        t_one.append(time_generate(model, tok, items, one, new_tokens))
    for name, ts in (("dlp_time", t_dlp), ("one_adapter_time", t_one)):
        rows.append({"task": "mixed64", "method": name, "median_s": statistics.median(ts), "min_s": min(ts),
                     "max_s": max(ts), "repeats": len(ts), "batch": 64, "new_tokens": new_tokens})
    print(f"  mixed64: exact match dlp {sum(dlp_ok) / 64:.3f} oracle {sum(oracle_ok) / 64:.3f}; time dlp "
          f"{statistics.median(t_dlp):.2f} s, one adapter {statistics.median(t_one):.2f} s", flush=True)

    per = {m: statistics.mean(r["metric"] for r in rows if r["method"] == m and r["task"] != "mixed64")
           for m in ("dlp", "oracle", "uniform", "base", "dlp_compressed")}
    summary = {"routing_kept_accuracy": statistics.mean(kept_all), "routing_top1_accuracy": statistics.mean(top1_all),
               "routing_kept_accuracy_input_only": statistics.mean(bare_kept),
               "fusion_vs_oracle": (sum(dlp_ok) / max(sum(oracle_ok), 1)),
               "fusion_vs_oracle_per_task_mean": per["dlp"] / max(per["oracle"], 1e-9),
               "fusion_vs_uniform": per["dlp"] / max(per["uniform"], 1e-9),
               "compressed_fusion_vs_oracle": per["dlp_compressed"] / max(per["oracle"], 1e-9),
               "mixed_batch_time_ratio": statistics.median(t_dlp) / statistics.median(t_one),
               "per_task_means": per}
    payload = {"machine": machine_info(), "mode": "quick" if quick else "full", "new_tokens": new_tokens, "tasks": tasks,
               "router": {"parameters": router.num_parameters(), "prompts": router.record["prompts"],
                          "train_seconds": train_s, "top_p": router.top_p, "hidden": router.hidden,
                          "train_accuracy": router.record["train_accuracy"]},
               "rows": rows, "summary": summary}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=1))
    md = markdown(payload)
    json_path.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
