"""ICM-LoRA on SmolLM2-135M: adapters generated from task examples against the originals and two baselines.

Tasks are two families with a parameter (add a constant addcC, subtract a constant subcC, C = 1..12); four
members are held out (lorakern.apps.icm.HELDOUT). Builds what is missing first (cached in $LORAKERN_CACHE):
each seen task's trajectory of rank-2 q/v LoRA checkpoints, then the CVAE generator.

Per task it measures, on 100 held-out examples, exact match (higher is better) and the answer tokens'
negative log-likelihood (lower is better) of:
  base             no adapter
  original         the task's own trained adapter (seen tasks; held-out ones too, for reference)
  generated        the generator's adapter from 32 examples it never saw (the prior's mean latent, z = 0)
  generated_stage1 the same from the generator before its fine-tuning on the tasks' loss (CVAE stage only)
  mean_adapter     the mean of all seen tasks' adapters
  nearest_adapter  the seen task whose task vector is nearest in the generator's condition coordinates
                   (held-out tasks)
and reports the generator's bytes against the fp16 bytes of the adapters it stands for (seen and held-out),
and plots generated against original exact match per task (PNG beside the JSON).

    python benchmarks/eval_icm_lora.py [--json PATH] [--examples N] [--retrain] [--finetune-steps N]
                                       [--condition-seed SEED]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import machine_info

from lorakern.adapters.attach import apply_adapter
from lorakern.apps.icm import (HELDOUT, SEEN, AdapterGenerator, GeneratorTrainConfig, condition_vectors,
                               default_generator_path, ensure_generator, ensure_trajectories, flatten_adapter,
                               unflatten_adapter)
from lorakern.apps.icm.pipeline import CONDITION_EXAMPLES, EVAL_SEED, FINETUNE_STEPS, stage1_path
from lorakern.models.smollm2 import load_smollm2
from lorakern.apps.train import answer_nll, exact_match, get_task


def measure(model, tok, task_name, adapter, n):
    task = get_task(task_name)
    if adapter is None:
        return exact_match(model, tok, task, n=n), answer_nll(model, tok, task, n=n)
    with apply_adapter(model, adapter):
        return exact_match(model, tok, task, n=n), answer_nll(model, tok, task, n=n)


def markdown(rows, summary, storage, condition_seed: int = EVAL_SEED, machine: dict | None = None) -> str:
    methods = ["base", "original", "generated", "generated_stage1", "mean_adapter", "nearest_adapter"]
    out = ["# ICM-LoRA on SmolLM2-135M (rank-2 q/v adapters)", "",
           "Exact match on 100 held-out examples (answer NLL per token in parentheses; lower is better). "
           f"Generated adapters read {CONDITION_EXAMPLES} examples drawn with seed {condition_seed}"
           + (f"; machine: {machine.get('cpu')}, {machine.get('threads')} threads, {machine.get('date')}."
              if machine else "."), ""]
    for split in ("seen", "heldout"):
        out += [f"## {split}", "", "| task | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        tasks = sorted({r["task"] for r in rows if r["split"] == split}, key=lambda t: (t.rstrip("0123456789"),
                                                                                        int(t.lstrip("abcdersuz"))))
        for t in tasks:
            cells = []
            for m in methods:
                em = [r["metric"] for r in rows if r["task"] == t and r["method"] == m and
                      r["metric_name"] == "exact_match"]
                nll = [r["metric"] for r in rows if r["task"] == t and r["method"] == m and
                       r["metric_name"] == "answer_nll"]
                cells.append(f"{em[0]:.2f} ({nll[0]:.2f})" if em else "")
            out.append(f"| {t} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["## Summary", "", "```", json.dumps(summary, indent=1), "```", "", "## Storage", "", "```",
            json.dumps(storage, indent=1), "```", ""]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "icm_lora.json"))
    ap.add_argument("--examples", type=int, default=100, help="evaluation examples per task (default 100)")
    ap.add_argument("--epochs", type=int, default=GeneratorTrainConfig.epochs)
    ap.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS,
                    help=f"steps of the generator's fine-tuning on the tasks' loss (default {FINETUNE_STEPS}; 0: none)")
    ap.add_argument("--retrain", action="store_true", help="retrain the generator (trajectories stay cached)")
    ap.add_argument("--condition-seed", type=int, default=EVAL_SEED,
                    help=f"seed of the examples the task vectors read (default {EVAL_SEED}; another seed is another "
                         "draw of 32 examples per task)")
    ap.add_argument("--no-heldout-originals", action="store_true",
                    help="skip training the held-out tasks' own adapters (reference only)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    gen, rec = ensure_generator(model, tok, retrain=args.retrain, train=GeneratorTrainConfig(epochs=args.epochs),
                                finetune_steps=args.finetune_steps)
    s1 = stage1_path(default_generator_path())
    gen1 = AdapterGenerator.load(s1) if rec.get("finetune_steps") and s1.is_file() else None
    trajs = ensure_trajectories(model, tok, SEEN, progress=True)
    held_trajs = {} if args.no_heldout_originals else ensure_trajectories(model, tok, HELDOUT, progress=True)
    layout = gen.layout
    finals = torch.stack([flatten_adapter(t.final, layout) for t in trajs.values()])
    mean_adapter = unflatten_adapter(finals.mean(0), layout, gen.peft_config)
    seen_conds = {n: condition_vectors(model, tok, n, seed=args.condition_seed)[0] for n in SEEN}

    def cnorm(v):  # the generator's own condition coordinates (LDA), where tasks are told apart
        return gen.projection(v)

    rows, chosen = [], {}

    def add(task, split, method, em, nll):
        rows.append({"task": task, "split": split, "method": method, "metric_name": "exact_match", "metric": em,
                     "higher_is_better": True})
        rows.append({"task": task, "split": split, "method": method, "metric_name": "answer_nll", "metric": nll,
                     "higher_is_better": False})
        print(f"{task:9s} {split:8s} {method:16s} exact {em:.2f}  nll {nll:.3f}", flush=True)

    for split, names in (("seen", SEEN), ("heldout", HELDOUT)):
        for name in names:
            cond = (seen_conds[name] if name in seen_conds else
                    condition_vectors(model, tok, name, seed=args.condition_seed)[0])
            add(name, split, "base", *measure(model, tok, name, None, args.examples))
            own = trajs.get(name) or held_trajs.get(name)
            if own is not None:
                add(name, split, "original", *measure(model, tok, name, own.final, args.examples))
            add(name, split, "generated", *measure(model, tok, name, gen.generate(cond), args.examples))
            if gen1 is not None:
                add(name, split, "generated_stage1", *measure(model, tok, name, gen1.generate(cond), args.examples))
            add(name, split, "mean_adapter", *measure(model, tok, name, mean_adapter, args.examples))
            if split == "heldout":
                dist = {s: float((cnorm(cond) - cnorm(c)).norm()) for s, c in seen_conds.items()}
                chosen[name] = min(dist, key=dist.get)
                add(name, split, "nearest_adapter", *measure(model, tok, name, trajs[chosen[name]].final,
                                                             args.examples))

    def get(task, method, metric="exact_match"):
        v = [r["metric"] for r in rows if r["task"] == task and r["method"] == method and r["metric_name"] == metric]
        return v[0] if v else None

    seen_ratio = {t: get(t, "generated") / get(t, "original") if get(t, "original") else None for t in SEEN}
    within = [t for t, r in seen_ratio.items() if r is not None and r >= 0.95]
    stage1 = ({t: get(t, "generated_stage1") / get(t, "original") for t in SEEN if get(t, "original")}
              if gen1 is not None else {})
    held_ratio = {t: get(t, "generated") / get(t, "original") if get(t, "original") else None for t in HELDOUT}
    better = {t: {"exact_match": get(t, "generated") > max(get(t, "mean_adapter"), get(t, "nearest_adapter")),
                  "answer_nll": get(t, "generated", "answer_nll") < min(get(t, "mean_adapter", "answer_nll"),
                                                                        get(t, "nearest_adapter", "answer_nll"))}
              for t in HELDOUT}
    summary = {"seen_generated_over_original": seen_ratio,
               "seen_within_5pct": f"{len(within)}/{len(SEEN)}",
               "seen_mean_retention": (sum(r for r in seen_ratio.values() if r is not None)
                                       / max(1, sum(r is not None for r in seen_ratio.values()))),
               "stage1_seen_within_5pct": f"{sum(r >= 0.95 for r in stage1.values())}/{len(SEEN)}" if stage1 else None,
               "stage1_seen_mean_retention": sum(stage1.values()) / len(stage1) if stage1 else None,
               "heldout_generated_over_original": held_ratio,
               "heldout_within_10pct": f"{sum(r is not None and r >= 0.9 for r in held_ratio.values())}/{len(HELDOUT)}",
               "heldout_nearest_task": chosen,
               "heldout_generated_beats_both_baselines": better}
    fp16_each = layout.numel * 2
    stands_for = len(SEEN) + len(HELDOUT)
    storage = {"generator_bytes": gen.num_bytes(),
               "generator_parts_bytes": {"basis": gen.basis.num_bytes(), "projection": gen.projection.num_bytes(),
                                         "cvae": sum(t.numel() * t.element_size() for t in gen.cvae.state_dict().values()),
                                         "normalizer": 8 * len(layout.segments)},
               "basis": {"directions": gen.basis.k, "bits": gen.basis.bits},
               "adapter_params_each": layout.numel, "adapter_fp16_bytes_each": fp16_each,
               "adapters_stood_for": stands_for, "adapters_fp16_bytes": stands_for * fp16_each,
               "generator_over_adapters_fp16": gen.num_bytes() / (stands_for * fp16_each),
               "generator_over_seen_adapters_fp16": gen.num_bytes() / (len(SEEN) * fp16_each),
               "trajectory_checkpoints_fp16_bytes": sum(t.checkpoints.numel() * 2 for t in trajs.values())}
    payload = {"machine": machine_info(), "seconds": round(time.perf_counter() - t0, 1),
               "condition_seed": args.condition_seed, "condition_examples": CONDITION_EXAMPLES,
               "generator": {k: v for k, v in rec.items() if k != "history"},
               "generator_final_epoch": rec["history"][-1], "seen": list(SEEN), "heldout": list(HELDOUT),
               "trajectories": {n: t.record for n, t in {**trajs, **held_trajs}.items()},
               "summary": summary, "storage": storage, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=1))
    Path(args.json).with_suffix(".md").write_text(markdown(rows, summary, storage, args.condition_seed,
                                                           payload["machine"]))
    print(json.dumps(summary, indent=1))
    print(json.dumps(storage, indent=1))
    png = plot(rows, Path(args.json).with_suffix(".png"), payload["machine"])
    print(f"wrote {args.json}, {Path(args.json).with_suffix('.md')}{' and ' + str(png) if png else ''} "
          f"({payload['seconds']:.0f} s)")


def plot(rows, path: Path, machine: dict):
    """Generated against original exact match, one marker per task (seen / held-out), with the goals' bands."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    em = {(r["task"], r["method"]): r["metric"] for r in rows if r["metric_name"] == "exact_match"}
    fig, ax = plt.subplots(figsize=(6.4, 6))
    xs = [0, 1]
    ax.plot(xs, xs, color="k", lw=0.8, label="generated = original")
    ax.plot(xs, [0.95 * x for x in xs], color="tab:blue", lw=0.8, ls="--", label="95% (seen goal)")
    ax.plot(xs, [0.90 * x for x in xs], color="tab:red", lw=0.8, ls=":", label="90% (held-out goal)")
    for split, marker, color in (("seen", "o", "tab:blue"), ("heldout", "s", "tab:red")):
        tasks = sorted({r["task"] for r in rows if r["split"] == split})
        pts = [(em[(t, "original")], em[(t, "generated")], t) for t in tasks if (t, "original") in em]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=split, zorder=3)
        for x, y, t in pts:
            ax.annotate(t, (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("original adapter: exact match")
    ax.set_ylabel("generated adapter: exact match")
    ax.set_xlim(0.6, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"ICM-LoRA on SmolLM2-135M ({machine.get('cpu', '?')})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
