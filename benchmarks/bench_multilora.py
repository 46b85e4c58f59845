"""Batched multi-adapter LoRA: lorakern against its peers, in one run.

    python benchmarks/bench_multilora.py [--quick] [--json PATH] [--rounds N]

One linear layer, T tokens, a bank of n adapters, token t on adapter t % n (a distinct adapter per
token where n >= T). Every impl computes ``base + sum of the token's adapter`` from a given base
output (the adapter part alone: the base matmul is the same for all of them) and returns a new
tensor:

* ``lorakern_fp16``: multi_lora over an AdapterBank of fp16 adapters, called as MultiLoRALinear
  calls it (``LayerBank.apply``: the C++ kernel with the bank's pointers prepared once).
* ``lorakern_quant``: the same over LoRAQuant-compressed adapters (rho 0.9, 2-bit high part).
* ``peft``: PEFT's LoRA Linear holding the n adapters, its mixed-batch forward
  (``adapter_names=[...]``), fp32 weights (torch's fast CPU dtype).
* ``torch_loop``: a loop over the batch's adapters, ``y[idx] += (x[idx] A^T) B^T s`` with the index
  lists precomputed (PEFT's loop without its bookkeeping), fp32.
* ``torch_bmm``: gather every token's (zero-padded) A and B^T, two bmm (vLLM's CPU path), fp32.
* ``single_adapter``: one rank-16 adapter's fp32 matmuls over all T tokens (the roofline a
  multi-adapter batch is compared with).

Shapes: 4096 x 4096 at rank 16 and at mixed ranks 8/16/64 (adapter i has rank (8, 16, 64)[i % 3]),
T in {1, 16, 64, 256}, n in {1, 8, 64, 512}; SmolLM2-135M's q (576 x 576), v (192 x 576), up
(1536 x 576) and down (576 x 1536) at rank 16, n = 64. --quick: 4096, rank 16, T = 64, n = 64.
Each impl rotates through copies of its adapters (distinct memory, same values; at least 256 MiB of
them, --quick 64 MiB, at most 256 copies), and when the bank has more adapters than the batch has
tokens, successive calls move the mapping through the bank (call i: token t on adapter (t + vT) % n,
v = i % V, V <= 8), so that L3 cannot serve the adapters. Every output is checked
against an fp64 reference in the same run (``max_rel_err``). The machine's read bandwidth is
measured in the same run (torch.sum over 256 MiB, before and after). Rows: {"impl", "shape", "T", "num_adapters", "rank", "median_ms",
"adapter_bytes", ...}. Writes benchmarks/results/multilora.json and .md (quick: multilora_quick.*);
--markdown-only JSON renders an earlier run's tables.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

from common import Case, bandwidth_case, copies_for, machine_info, run_interleaved, summary, write_json

from lorakern.adapters.peft_io import LoraLayer
from lorakern.multilora import AdapterBank
from lorakern.quant import compress_lora

SHAPES = {"4096": (4096, 4096), "smollm2_q": (576, 576), "smollm2_v": (192, 576), "smollm2_up": (1536, 576),
          "smollm2_down": (576, 1536)}
IMPLS = ("lorakern_fp16", "lorakern_quant", "peft", "torch_loop", "torch_bmm", "single_adapter")
BMM_MAX_BYTES = 1 << 30
MAX_COPIES = 256  # small banks: at most this many copies (>= 64 MiB touched per rotation at 256 KiB each)  # torch_bmm's gathered weights per call; above this the row is skipped


def rank_of(i: int, ranks: str) -> int:
    return 16 if ranks == "16" else (8, 16, 64)[i % 3]


def make_adapters(n, N, K, ranks, gen):
    """n fp32 factor pairs with decaying spectra, scale 2."""
    out = []
    for i in range(n):
        r = rank_of(i, ranks)
        B = torch.randn(N, r, generator=gen) * (0.8 ** torch.arange(r)) * 0.05
        A = torch.randn(r, K, generator=gen) / K ** 0.5
        out.append(LoraLayer(A, B, 2.0))
    return out


def peft_layer(N, K, adapters, base_out):
    """PEFT's lora.Linear with every adapter; its base layer hands back a fresh copy of base_out."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    class _Base(torch.nn.Linear):  # base_out is captured, not an attribute: layer copies share it
        def forward(self, x):
            return base_out.clone()

    base = _Base(K, N, bias=False, device="meta")
    layer = None
    for i, ad in enumerate(adapters):
        r = ad.A.shape[0]
        cfg = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False)
        if layer is None:
            layer = PeftLinear(base, f"a{i}", config=cfg, r=r, lora_alpha=2 * r, init_lora_weights=False)
        else:
            layer.update_layer(f"a{i}", r=r, lora_alpha=2 * r, config=cfg, init_lora_weights=False)
        layer.lora_A[f"a{i}"].weight = torch.nn.Parameter(ad.A.clone(), requires_grad=False)
        layer.lora_B[f"a{i}"].weight = torch.nn.Parameter(ad.B.clone(), requires_grad=False)
    return layer.eval()


def reference(x, base, adapters, ids):
    y = base.double().clone()
    for t, i in enumerate(ids):
        ad = adapters[i]
        y[t] += ad.scale * (x[t].double() @ ad.A.double().t()) @ ad.B.double().t()
    return y


def rel_err(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def footprint(obj) -> int:
    """Bytes of the tensors an object holds (a LayerBank's slabs, a module's parameters, nested lists)."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if hasattr(obj, "slabs"):
        return sum(footprint(t) for t in obj.slabs())
    if isinstance(obj, torch.nn.Module):
        return sum(footprint(t) for t in obj.parameters())
    if isinstance(obj, (list, tuple)):
        return sum(footprint(o) for o in obj)
    return 0


def cell(shape, N, K, ranks, T, n, gen, min_total, rounds, rows):
    adapters = make_adapters(n, N, K, ranks, gen)
    # mapping variants: call i uses variant i % V, token t on adapter (t + v T) % n -- successive calls walk
    # through the whole bank when it has more adapters than a batch has tokens
    V = min(-(-n // T), 8)
    maps = [[(t + v * T) % n for t in range(T)] for v in range(V)]
    ids = maps[0]
    used = sorted(set(ids))
    x = torch.randn(T, K, generator=gen)
    base = torch.randn(T, N, generator=gen)
    want = reference(x, base, adapters, ids)
    cases, meta = [], {}

    def add(impl, fn, obj, nbytes, check, **extra):
        """fn(obj, v); copies of obj (distinct memory) so that the rotation streams >= min_total bytes."""
        cp = min(copies_for(footprint(obj), min_total), MAX_COPIES)
        copies = [obj] + [copy.deepcopy(obj) for _ in range(cp - 1)]
        cases.append(Case(impl, lambda i, c=copies: fn(c[(i // V) % cp], i % V), copies=cp * V))
        meta[impl] = {"adapter_bytes": nbytes, "copies": cp, "mapping_variants": V, "max_rel_err": check, **extra}

    # lorakern, fp16 and compressed banks
    for impl in ("lorakern_fp16", "lorakern_quant"):
        bank = AdapterBank({"l": (N, K)}, dtype=torch.float16)
        for i, ad in enumerate(adapters):
            bank.add(f"a{i}", {"l": ad if impl == "lorakern_fp16" else
                               compress_lora(ad.B, ad.A, rho=0.9, bits_high=2, scale=ad.scale)})
        batches = [bank.batch(torch.tensor(m)) for m in maps]
        lb = bank.layers["l"]

        def run(lb, v, batches=batches):
            return lb.apply(x, base, batches[v])  # what MultiLoRALinear calls (the C++ kernel, bank pointers cached)
        if impl == "lorakern_fp16":
            err = rel_err(run(lb, 0), want)
        else:  # against the compressed adapters' own dequantized factors
            deq = [LoraLayer(*(lambda f: (f[1], f[0]))(
                compress_lora(ad.B, ad.A, rho=0.9, bits_high=2).factors()), ad.scale) for ad in adapters]
            err = rel_err(run(lb, 0), reference(x, base, deq, ids))
        add(impl, run, lb, sum(lb.nbytes(bank.id(f"a{i}")) for i in used), err)

    # PEFT's mixed batch
    layer = peft_layer(N, K, adapters, base)
    names = [[f"a{i}" for i in m] for m in maps]
    with torch.no_grad():
        err = rel_err(layer(x, adapter_names=names[0]), want)
    fp32_bytes = sum(adapters[i].A.numel() + adapters[i].B.numel() for i in used) * 4

    def run_peft(layer, v):
        with torch.no_grad():
            return layer(x, adapter_names=names[v])
    add("peft", run_peft, layer, fp32_bytes, err)

    # torch loop with precomputed indices
    groups = [[(torch.tensor([t for t in range(T) if m[t] == i]), i) for i in sorted(set(m))] for m in maps]
    loop_ads = [(adapters[i].A.clone(), adapters[i].B.t().contiguous(), adapters[i].scale) for i in range(n)]

    def run_loop(ads, v):
        y = base.clone()
        for idx, i in groups[v]:
            A, Bt, s = ads[i]
            y.index_add_(0, idx, (x[idx] @ A.t()) @ Bt, alpha=s)
        return y
    add("torch_loop", run_loop, loop_ads, fp32_bytes, rel_err(run_loop(loop_ads, 0), want))

    # gather + bmm over zero-padded stacks
    rmax = max(rank_of(i, ranks) for i in range(n))
    gathered = T * rmax * (N + K) * 4
    if gathered <= BMM_MAX_BYTES:
        A_st = torch.zeros(n, rmax, K)
        Bt_st = torch.zeros(n, rmax, N)
        for i, ad in enumerate(adapters):
            r = ad.A.shape[0]
            A_st[i, :r] = ad.A
            Bt_st[i, :r] = ad.B.t() * ad.scale
        idts = [torch.tensor(m) for m in maps]

        def run_bmm(st, v):
            A_s, Bt_s = st
            t = torch.bmm(x.unsqueeze(1), A_s[idts[v]].transpose(1, 2))
            return base + torch.bmm(t, Bt_s[idts[v]]).squeeze(1)
        add("torch_bmm", run_bmm, (A_st, Bt_st), len(used) * rmax * (N + K) * 4,
            rel_err(run_bmm((A_st, Bt_st), 0), want), gathered_bytes=gathered)
    else:
        print(f"  torch_bmm skipped: {gathered / 2**30:.1f} GiB of gathered weights per call")

    # one rank-16 adapter over all T tokens
    one = make_adapters(1, N, K, "16", gen)[0]
    single = (one.A.clone(), one.B.t().contiguous(), one.scale)

    def run_single(ad, v):
        A, Bt, s = ad
        return torch.addmm(base, x @ A.t(), Bt, alpha=s)
    want1 = base.double() + one.scale * (x.double() @ one.A.double().t()) @ one.B.double().t()
    add("single_adapter", run_single, single, (one.A.numel() + one.B.numel()) * 4, rel_err(run_single(single, 0), want1))

    t0 = time.time()
    run_interleaved(cases, rounds)
    for c in cases:
        rank = ranks if ranks == "16" else "8/16/64"
        rows.append({"impl": c.name, "shape": shape, "N": N, "K": K, "T": T, "num_adapters": n, "rank": rank,
                     "distinct_adapters": len(used), **summary(c), **meta[c.name]})
    line = "  ".join(f"{c.name}={summary(c)['median_ms']:.3f}" for c in cases)
    print(f"{shape} r={ranks} T={T} n={n}: {line}  ({time.time() - t0:.0f} s)", flush=True)


def markdown(payload: dict) -> str:
    """The results as tables: per shape and rank, one row per (T, n), median ms per impl, lorakern's speedup
    over PEFT and its ratio to the floor max(adapter bytes / read bandwidth, single adapter)."""
    rows, bw = payload["rows"], payload["read_gbps"]
    out = [f"# Multi-adapter LoRA ({payload['machine']['cpu']}, {payload['machine']['threads']} threads)", "",
           f"Median ms per call; read bandwidth {bw:.1f} GB/s measured in the same run. floor = max(adapter bytes "
           "/ bandwidth, single_adapter). Generated by benchmarks/bench_multilora.py.", ""]
    if payload.get("targets"):
        t = payload["targets"]
        out += [f"Targets (4096, rank 16, T = 64, 64 adapters): lorakern_fp16 {t['fp16_speedup_vs_peft']:.1f}x faster "
                f"than PEFT (target >= 5x), {t['fp16_over_floor']:.2f}x its floor (target <= 1.5x); lorakern_quant "
                f"{t['quant_over_single_adapter']:.2f}x the single adapter (target <= 1.5x).", ""]
    groups = {}
    for r in rows:
        groups.setdefault((r["shape"], r["rank"]), {}).setdefault((r["T"], r["num_adapters"]), {})[r["impl"]] = r
    for (shape, rank), cells in groups.items():
        out += [f"## {shape} ({cells[next(iter(cells))]['lorakern_fp16']['N']} x "
                f"{cells[next(iter(cells))]['lorakern_fp16']['K']}), rank {rank}", "",
                "| T | adapters | " + " | ".join(IMPLS) + " | fp16 vs PEFT | fp16 / floor | quant / single |",
                "|---|---|" + "---|" * (len(IMPLS) + 3)]
        for (T, n), by in sorted(cells.items()):
            ms = [f"{by[i]['median_ms']:.3f}" if i in by else "—" for i in IMPLS]
            single = by["single_adapter"]["median_ms"]
            floor = max(by["lorakern_fp16"]["adapter_bytes"] / (bw * 1e9) * 1e3, single)
            out.append(f"| {T} | {n} | " + " | ".join(ms) +
                       f" | {by['peft']['median_ms'] / by['lorakern_fp16']['median_ms']:.1f}x"
                       f" | {by['lorakern_fp16']['median_ms'] / floor:.2f}"
                       f" | {by['lorakern_quant']['median_ms'] / single:.2f} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096, rank 16, T = 64, n = 64 (under a minute)")
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--markdown-only", metavar="JSON", help="only render JSON (from an earlier run) as markdown")
    a = ap.parse_args(argv)
    if a.markdown_only:
        import json
        with open(a.markdown_only) as f:
            md = markdown(json.load(f))
        path = os.path.splitext(a.markdown_only)[0] + ".md"
        with open(path, "w") as f:
            f.write(md + "\n")
        print(f"wrote {path}")
        return 0
    gen = torch.Generator().manual_seed(0)
    rounds = a.rounds or (40 if a.quick else 10)
    min_total = (64 if a.quick else 256) * 2**20
    grid = []
    if a.quick:
        grid.append(("4096", "16", 64, 64))
    else:
        for ranks in ("16", "mixed"):
            for T in (1, 16, 64, 256):
                for n in (1, 8, 64, 512):
                    grid.append(("4096", ranks, T, n))
        for shape in ("smollm2_q", "smollm2_v", "smollm2_up", "smollm2_down"):
            for T in (1, 16, 64, 256):
                grid.append((shape, "16", T, 64))
    bw = bandwidth_case()  # 256 MiB in both modes: L3 must not serve it
    run_interleaved([bw], 5)
    rows = []
    t0 = time.time()
    for shape, ranks, T, n in grid:
        N, K = SHAPES[shape]
        cell(shape, N, K, ranks, T, n, gen, min_total, rounds, rows)
    run_interleaved([bw], 5)
    read_gbps = bw.bytes_per_call / statistics.median(bw.times) / 1e9
    for r in rows:
        r["floor_ms"] = max(r["adapter_bytes"] / (read_gbps * 1e9) * 1e3, 0.0)
    bad = [r for r in rows if r["max_rel_err"] > 1e-2]  # a wrong answer is not a result (int8 activations: ~1e-3)
    for r in bad:
        print(f"WRONG RESULT: {r['impl']} {r['shape']} r={r['rank']} T={r['T']} n={r['num_adapters']}: "
              f"max_rel_err {r['max_rel_err']:.3g}")
    targets = {}
    key = [r for r in rows if r["shape"] == "4096" and r["rank"] == "16" and r["T"] == 64 and r["num_adapters"] == 64]
    if key:
        by = {r["impl"]: r for r in key}
        fp16, quant, single, peft = (by[i]["median_ms"] for i in ("lorakern_fp16", "lorakern_quant", "single_adapter",
                                                                  "peft"))
        floor = max(by["lorakern_fp16"]["adapter_bytes"] / (read_gbps * 1e9) * 1e3, single)
        targets = {"fp16_speedup_vs_peft": peft / fp16, "fp16_speedup_vs_peft_target": 5.0,
                   "fp16_over_floor": fp16 / floor, "fp16_over_floor_target": 1.5, "floor_ms": floor,
                   "quant_over_single_adapter": quant / single, "quant_over_single_adapter_target": 1.5}
        print("targets (4096, r16, T=64, 64 adapters): " + ", ".join(f"{k}={v:.3g}" for k, v in targets.items()))
    payload = {"wrong_results": len(bad), "machine": machine_info(), "read_gbps": read_gbps, "rounds": rounds, "stream_bytes": min_total,
               "seconds": time.time() - t0, "targets": targets, "rows": rows}
    out = a.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 "multilora_quick.json" if a.quick else "multilora.json")
    write_json(out, payload)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown(payload) + "\n")
    print(f"wrote {os.path.splitext(out)[0]}.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
