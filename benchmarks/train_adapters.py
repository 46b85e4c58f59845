"""Train the adapter suite on SmolLM2-135M (CPU): one LoRA per generated task and a
WikiText-2 language-modelling adapter, cached in $LORAKERN_CACHE/adapters (not in the
repository). Prints and writes each adapter's metric before and after and its
training time.

    python benchmarks/train_adapters.py [--only add,sort] [--retrain] [--steps N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import machine_info

from lorakern.models.smollm2 import load_smollm2
from lorakern.apps.train.suite import adapter_dir, ensure_suite, suite_names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated adapter names (default: the whole suite)")
    ap.add_argument("--retrain", action="store_true", help="train even if cached")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "adapter_suite.json"))
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else suite_names()
    unknown = set(names) - set(suite_names())
    if unknown:
        ap.error(f"unknown adapters {sorted(unknown)}; the suite is {suite_names()}")
    torch.manual_seed(0)
    model, tok = load_smollm2()
    t0 = time.perf_counter()
    records = ensure_suite(model, tok, names, retrain=args.retrain)
    total = time.perf_counter() - t0
    print(f"\n{'adapter':10s} {'metric':12s} {'base':>8s} {'trained':>8s} {'train s':>8s}  description")
    for name, r in records.items():
        print(f"{name:10s} {r['metric_name']:12s} {r['base']:8.3f} {r['trained']:8.3f} {r['train_seconds']:8.0f}  "
              f"{r['description']}")
    print(f"total {total:.0f} s (cached adapters cost nothing); adapters in {adapter_dir('x').parent}")
    out = {"machine": machine_info(), "threads": torch.get_num_threads(), "adapters": list(records.values())}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
