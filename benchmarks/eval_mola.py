"""MoLA against plain LoRA on a mixture of the suite's tasks, at equal trainable parameters and training budget.

    python benchmarks/eval_mola.py [--quick] [--json PATH] [--steps N] [--eval-examples N]

SmolLM2-135M-Instruct (fp32) is trained on a mixture of the adapter suite's six generated tasks (every
step's batch spread evenly over them, fresh examples each step, seeds fixed) with:

* MoLA (``lorakern.apps.train.train_mola_adapter``): rank-8 experts (alpha 16) and a top-2 router on all
  seven projections of every layer, the paper's four allocations over four groups of layers (2-4-6-8,
  8-6-4-2, 8-2-2-8, 5-5-5-5; SmolLM2's 30 layers split 8, 8, 7, 7), load-balancing coefficient 1e-3;
* plain LoRA (``train_mixture_adapter``) on the same projections with the rank whose trainable parameters
  come closest to the MoLA adapters' mean (routers counted), alpha = 2 r (the experts' scale 2);
* the base model without adapter.

Same steps, batch, learning rate, schedule and seed for every method. Each trained adapter is served through
lorakern (MoLA: ``attach_mola``, one multi-adapter kernel call per layer; LoRA: ``apply_adapter``) and scored
by exact match of greedy answers on held-out examples of each task (seeds disjoint from training). The
binomial standard error of an exact-match rate p over n examples is sqrt(p (1 - p) / n) (<= 0.05 at n = 100):
differences smaller than about twice that are noise, and one training seed per method is run.

Rows ``{"method": "mola" | "lora" | "base", "allocation", "trainable_params", "task", "metric", "metric_name",
"train_seconds", "steps"}`` in benchmarks/results/mola.json (quick: mola_quick.json) and a markdown table
beside it. The paper's claim under test: 2-4-6-8 (more experts in higher layers) does best at equal parameters.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from common import machine_info, write_json

from lorakern.adapters import apply_adapter, apply_mola, save_mola_adapter
from lorakern.apps.train import (DEFAULT_TARGETS, SUITE, MoLATrainConfig, TrainConfig, exact_match, get_task,
                                 train_mixture_adapter, train_mola_adapter)
from lorakern.data.cache import cache_dir
from lorakern.formats.mola import ALLOCATIONS, allocate_experts, layer_index
from lorakern.models import load_smollm2

RANK, ALPHA = 8, 16.0


def mola_params(model, allocation) -> int:
    """Trainable parameters of a MoLA adapter on ``model``: per projection E (r (N + K) + K)."""
    counts = allocate_experts(allocation, model.config.num_hidden_layers)
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in DEFAULT_TARGETS and ".layers." in name:
            E = counts[layer_index(name)]
            n += E * (RANK * (m.in_features + m.out_features) + m.in_features)
    return n


def lora_params(model, rank) -> int:
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in DEFAULT_TARGETS and ".layers." in name)


def evaluate(model, tok, tasks, n) -> dict:
    return {t.name: exact_match(model, tok, t, n=n) for t in tasks}


def markdown(payload) -> str:
    rows = payload["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    m = payload["machine"]
    out = [f"# MoLA vs LoRA on a mixture of the suite's tasks (SmolLM2-135M)\n",
           f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['date']}. {payload['steps']} steps "
           f"x batch {payload['batch_size']} (spread over {len(tasks)} tasks), lr {payload['lr']}, seed 0; exact match "
           f"on {payload['eval_examples']} held-out examples per task (binomial standard error <= "
           f"{0.5 / math.sqrt(payload['eval_examples']):.3f}).\n",
           "| method | allocation | trainable params | " + " | ".join(tasks) + " | mean | train s |",
           "|---|---|---|" + "---|" * (len(tasks) + 2)]
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["allocation"]), []).append(r)
    for (method, alloc), rs in groups.items():
        by = {r["task"]: r["metric"] for r in rs}
        mean = sum(by.values()) / len(by)
        out.append(f"| {method} | {alloc or '-'} | {rs[0]['trainable_params']:,} | "
                   + " | ".join(f"{by[t]:.2f}" for t in tasks) + f" | **{mean:.3f}** | {rs[0]['train_seconds']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps and examples: checks the pipeline end to end")
    ap.add_argument("--json", help="default benchmarks/results/mola.json (quick: mola_quick.json)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-examples", type=int)
    ap.add_argument("--allocations", nargs="*", default=list(ALLOCATIONS))
    a = ap.parse_args(argv)
    steps = a.steps or (4 if a.quick else 150)
    n_eval = a.eval_examples or (10 if a.quick else 100)
    model, tok = load_smollm2()
    tasks = [get_task(n) for n in SUITE]
    payload = {"machine": machine_info(), "steps": steps, "batch_size": a.batch_size, "lr": a.lr,
               "eval_examples": n_eval, "tasks": [t.name for t in tasks], "rows": []}

    def record(method, alloc, params, metrics, secs):
        for t, v in metrics.items():
            payload["rows"].append({"method": method, "allocation": alloc, "trainable_params": params, "task": t,
                                    "metric": v, "metric_name": "exact_match", "train_seconds": round(secs, 1),
                                    "steps": steps})
        print(f"{method} {alloc or ''}: {params:,} params, mean {sum(metrics.values()) / len(metrics):.3f} "
              f"{ {k: round(v, 2) for k, v in metrics.items()} } ({secs:.0f} s)", flush=True)

    record("base", None, 0, evaluate(model, tok, tasks, n_eval), 0.0)
    target = sum(mola_params(model, al) for al in a.allocations) / len(a.allocations)
    r_lora = min(range(1, 129), key=lambda r: abs(lora_params(model, r) - target))
    out_dir = cache_dir() / "mola"
    for alloc in a.allocations:
        cfg = MoLATrainConfig(steps=steps, batch_size=a.batch_size, lr=a.lr, allocation=alloc, rank=RANK, alpha=ALPHA,
                              top_k=2, aux_loss_coef=1e-3)
        t0 = time.perf_counter()
        ad = train_mola_adapter(model, tok, tasks, cfg)
        secs = time.perf_counter() - t0
        if not a.quick:
            save_mola_adapter(ad, out_dir / alloc)
        with apply_mola(model, ad, dtype=torch.float32):
            metrics = evaluate(model, tok, tasks, n_eval)
        record("mola", alloc, ad.num_parameters(), metrics, secs)
    cfg = TrainConfig(rank=r_lora, alpha=2.0 * r_lora, steps=steps, batch_size=a.batch_size, lr=a.lr)
    t0 = time.perf_counter()
    lora = train_mixture_adapter(model, tok, tasks, cfg)
    secs = time.perf_counter() - t0
    with apply_adapter(model, lora):
        metrics = evaluate(model, tok, tasks, n_eval)
    record("lora", f"r={r_lora}", lora_params(model, r_lora), metrics, secs)
    path = a.json or f"benchmarks/results/mola{'_quick' if a.quick else ''}.json"
    write_json(path, payload)
    md = markdown(payload)
    with open(path.rsplit(".", 1)[0] + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
