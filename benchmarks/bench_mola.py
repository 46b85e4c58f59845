"""MoLA layer and model speed: the multi-adapter kernel path against the per-expert loop and one plain LoRA.

    python benchmarks/bench_mola.py [--quick] [--json PATH] [--rounds N] [--no-model]

One MoLA layer (E = 8 experts of rank 8, top-2, hidden 4096 and SmolLM2's 576), T in {1, 16, 64} tokens.
Every impl adds the adapter part to a given base output (the base matmul is the same for all):

* ``mola``: what :class:`lorakern.nn.MoLALinear` runs on the CPU (``add_experts``): the router's fp32
  matmul, one C++ call for softmax / stable top-2 / renormalisation / grouping by expert
  (``lk_route_top_k``), one ``multi_lora`` call over the layer's fp16 expert bank (the C++ kernel).
* ``mola_loraquant``: the same with LoRAQuant-compressed experts (rho 0.9, 2-bit high part; int8 activations).
* ``expert_loop``: the same router, then MoLA's reference code: a Python loop over experts, each adding
  ``w * s * (x[rows] A^T) B^T`` to the tokens that chose it (torch fp32, its fast CPU dtype).
* ``single_lora``: one rank-8 LoRA for every token through the same kernel (fp16 bank, no router).
* ``single_lora_torch``: one rank-8 LoRA as two fp32 torch matmuls (for scale).

Each impl rotates through copies of its weights (>= 256 MiB, --quick 64 MiB, <= 256 copies) so that the
caches cannot serve them; interleaved rounds, medians and quartiles; every output checked against the fp64
loop (``max_rel_err``). Then the whole SmolLM2-135M (RTN 4-bit base, batch 1, greedy, 32-token prompt,
64 new tokens, eager generate): a random MoLA 2-4-6-8 adapter of rank-8 experts on all seven projections
against one plain rank-8 LoRA on the same projections (``attach_adapter``: LoRALinear with its default fp32
factors); the MoLA experts are fp16 in the bank (``attach_mola``'s default).

Rows: ``{"impl", "N", "K", "T", "median_ms", "p25_ms", "p75_ms", "max_rel_err", ...}`` and model rows
``{"model", "adapter", "tokens_per_s", ...}``. Writes benchmarks/results/mola_speed.json
(quick: mola_speed_quick.json) and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch

from common import Case, copies_for, machine_info, run_interleaved, summary, write_json

from lorakern.formats.lora import LoraLayer
from lorakern.formats.mola import MoLALayer
from lorakern.multilora import LayerBank, LoRABatch
from lorakern.quant import compress_lora
from lorakern.nn import MoLALinear
from lorakern.nn.mola_linear import mola_expert_loop

E, R, TOP_K = 8, 8, 2
MAX_COPIES = 256


def make_layer(N, K, gen, E=E, r=R) -> MoLALayer:
    experts = [LoraLayer(torch.randn(r, K, generator=gen) / K ** 0.5, torch.randn(N, r, generator=gen) * 0.05, 2.0)
               for _ in range(E)]
    return MoLALayer(torch.randn(E, K, generator=gen) / K ** 0.5 * 4, experts)


def bank_of(experts, N, K) -> LayerBank:
    lb = LayerBank(N, K, torch.float16)
    for e, ex in enumerate(experts):
        lb.set(e, ex)
    return lb


def rel_err(y, ref):
    return float((y.double() - ref).abs().max() / (ref.abs().max().clamp_min(1e-30)))


def layer_cell(N, K, T, gen, min_total, rounds):
    layer = make_layer(N, K, gen)
    x = torch.randn(T, K, generator=gen)
    base = torch.randn(T, N, generator=gen)
    fp16 = MoLALayer(layer.router, [LoraLayer(e.A.half(), e.B.half(), e.scale) for e in layer.experts])
    want16 = mola_expert_loop(x, base, fp16, TOP_K)
    want = mola_expert_loop(x, base, layer, TOP_K)
    cases, meta = [], {}

    def add(impl, fn, objs, nbytes, err):
        cases.append(Case(impl, lambda i, c=objs: fn(c[i % len(c)]), copies=len(objs)))
        meta[impl] = {"weight_bytes": nbytes, "copies": len(objs), "max_rel_err": err}

    def copies(make, nbytes):
        n = min(copies_for(nbytes, min_total), MAX_COPIES)
        return [make() for _ in range(n)]

    # mola: router + device-side batch + one multi_lora call
    mola_bytes = E * R * (N + K) * 2 + E * K * 4

    def run_mola(m):
        return m.add_experts(x, base)  # MoLALinear.forward's adapter part
    shared = torch.nn.Linear(K, N, bias=False)  # (not called: the base output is given)
    objs = copies(lambda: MoLALinear(shared, layer, TOP_K), mola_bytes)
    add("mola", run_mola, objs, mola_bytes, rel_err(run_mola(objs[0]), want16))

    # mola_loraquant: the same with LoRAQuant-compressed experts (rho 0.9, 2-bit high part)
    from lorakern.formats.lora import lora_group_size
    cl = MoLALayer(layer.router, [compress_lora(e.B, e.A, rho=0.9, bits_high=2, scale=e.scale,
                                                group_size=min(lora_group_size(N), lora_group_size(K)))
                                  for e in layer.experts])
    deq = MoLALayer(layer.router, [LoraLayer(*(lambda f: (f[1], f[0]))(c.factors()), c.scale) for c in cl.experts])
    want_q = mola_expert_loop(x, base, deq, TOP_K)
    q_bytes = int(sum(e.bits_per_param() * e.rank * (N + K) for e in cl.experts) // 8) + E * K * 4
    objs = copies(lambda: MoLALinear(shared, cl, TOP_K), q_bytes)
    add("mola_loraquant", run_mola, objs, q_bytes, rel_err(run_mola(objs[0]), want_q))

    # expert_loop: MoLA's reference code (fp32)
    loop_bytes = E * R * (N + K) * 4 + E * K * 4

    def run_loop(lay):
        return mola_expert_loop(x, base, lay, TOP_K, dtype=torch.float32)
    objs = copies(lambda: copy.deepcopy(layer), loop_bytes)
    add("expert_loop", run_loop, objs, loop_bytes, rel_err(run_loop(objs[0]), want))

    # single_lora: one rank-8 adapter for all tokens, the same kernel
    one = layer.experts[0]
    one_batch = LoRABatch.from_ids(torch.zeros(T, dtype=torch.int64))
    want_one = base.double() + one.scale * (x.double() @ one.A.half().double().t()) @ one.B.half().double().t()

    def run_single(lb):
        return lb.apply(x, base, one_batch)
    objs = copies(lambda: bank_of([one], N, K), R * (N + K) * 2)
    add("single_lora", run_single, objs, R * (N + K) * 2, rel_err(run_single(objs[0]), want_one))

    want_one32 = base.double() + one.scale * (x.double() @ one.A.double().t()) @ one.B.double().t()

    def run_torch(ab):
        A, Bt = ab
        return base + (x @ A.t()) @ Bt * one.scale
    objs = copies(lambda: (one.A.clone(), one.B.t().contiguous()), R * (N + K) * 4)
    add("single_lora_torch", run_torch, objs, R * (N + K) * 4, rel_err(run_torch(objs[0]), want_one32))

    with torch.no_grad():
        run_interleaved(cases, rounds)
    rows = []
    for c in cases:
        rows.append({"impl": c.name, "N": N, "K": K, "T": T, "E": E, "rank": R, "top_k": TOP_K, **summary(c),
                     **meta[c.name]})
    return rows


def model_rows(new_tokens, repeats, rounds=3):
    """SmolLM2 RTN-4: MoLA 2-4-6-8 (random rank-8 experts) against one plain rank-8 LoRA, batch-1 decode."""
    from lorakern.adapters import attach_adapter, attach_mola, detach_adapter, detach_mola
    from lorakern.apps.evaluation import decode_speed
    from lorakern.apps.train import DEFAULT_TARGETS
    from lorakern.formats.mola import MoLAAdapter, MoLAConfig, allocate_experts, layer_index
    from lorakern.models import QuantConfig, load_smollm2, quantize_model

    model, tok = load_smollm2()
    torch.set_num_threads(torch.get_num_threads())
    quantize_model(model, QuantConfig(bits=4, group_size=32), progress=False)
    gen = torch.Generator().manual_seed(0)
    counts = allocate_experts("2-4-6-8", model.config.num_hidden_layers)
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in DEFAULT_TARGETS and ".layers." in n]
    layers, plain = {}, {}
    for n in names:
        N, K = model.get_submodule(n).out_features, model.get_submodule(n).in_features
        layers[n] = make_layer(N, K, gen, E=counts[layer_index(n)])
        plain[n] = layers[n].experts[0]
    mola = MoLAAdapter(MoLAConfig(tuple(counts), DEFAULT_TARGETS, R, 2.0 * R, TOP_K), layers)
    ids = tok("The history of the city of Rome begins with a small settlement on the banks of the river Tiber, "
              "where shepherds", return_tensors="pt").input_ids[:, :32]
    rows = []
    for label in ("none", "lora_r8", "mola_2-4-6-8") * rounds:  # interleaved rounds (the machine drifts)
        if label == "lora_r8":
            old = attach_adapter(model, plain)  # LoRALinear, its default fp32 factors (torch matmuls)
        elif label.startswith("mola"):
            old = attach_mola(model, mola, dtype=torch.float16)
        s = decode_speed(model, ids, new_tokens, repeats)
        if label == "lora_r8":
            detach_adapter(model, old)
        elif label.startswith("mola"):
            detach_mola(model, old)
        rows.append({"model": "SmolLM2-135M RTN-4 g32", "adapter": label, "batch": 1, "prompt_tokens": ids.shape[1],
                     "round": len(rows) // 3,
                     "new_tokens": new_tokens, "tokens_per_s": s.tokens_per_s, "ttft_ms": s.ttft_ms})
        print(f"model {label}: {s.tokens_per_s:.1f} tok/s", flush=True)
    return rows


def markdown(payload) -> str:
    m = payload["machine"]
    out = [f"# MoLA speed\n\nMachine: {m['cpu']}, {m['threads']} threads, lorakern ISA {m['lorakern_isa']}, "
           f"torch {m['torch']}, {m['date']}. E = {E} experts of rank {R}, top-{TOP_K}; adapter part only "
           "(base output given). Medians (ms) over interleaved rounds.\n",
           "| N x K | T | mola | mola_loraquant | expert_loop | single_lora | single_lora_torch | mola / single_lora | "
           "loop / mola |", "|---|---|---|---|---|---|---|---|---|"]
    cells = {}
    for r in payload["rows"]:
        cells.setdefault((r["N"], r["K"], r["T"]), {})[r["impl"]] = r["median_ms"]
    for (N, K, T), c in cells.items():
        out.append(f"| {N} x {K} | {T} | {c['mola']:.3f} | {c['mola_loraquant']:.3f} | {c['expert_loop']:.3f} | "
                   f"{c['single_lora']:.3f} | "
                   f"{c['single_lora_torch']:.3f} | {c['mola'] / c['single_lora']:.2f} | "
                   f"{c['expert_loop'] / c['mola']:.1f} |")
    if payload.get("model_rows"):
        by = {}
        for r in payload["model_rows"]:
            by.setdefault(r["adapter"], []).append(r["tokens_per_s"])
        out += ["", "Whole model (SmolLM2-135M, RTN 4-bit g32 base; random rank-8 experts on all seven projections), "
                "batch-1 greedy decode through `generate` (eager), tokens/s: median of interleaved rounds "
                "(each round: none, LoRA, MoLA), and every round's figure:", "",
                "| adapter | median tokens/s | rounds | vs none |", "|---|---|---|---|"]
        none = statistics.median(by["none"])
        for a, v in by.items():
            out.append(f"| {a} | {statistics.median(v):.1f} | {', '.join(f'{t:.1f}' for t in v)} | "
                       f"{statistics.median(v) / none:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="576 and 4096 at T = 1 and 64, fewer copies and rounds")
    ap.add_argument("--json", help="default benchmarks/results/mola_speed.json (quick: mola_speed_quick.json)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--no-model", action="store_true", help="skip the whole-model decode rows")
    a = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rounds = a.rounds or (3 if a.quick else 7)
    min_total = (64 if a.quick else 256) * 2**20
    rows = []
    for N, K in ((576, 576), (4096, 4096)):
        for T in ((1, 64) if a.quick else (1, 16, 64)):
            rows += layer_cell(N, K, T, gen, min_total, rounds)
            c = {r["impl"]: r["median_ms"] for r in rows[-5:]}
            print(f"{N}x{K} T={T}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in c.items()), flush=True)
    payload = {"machine": machine_info(), "rows": rows,
               "model_rows": [] if a.no_model else model_rows(16 if a.quick else 64, 2 if a.quick else 3)}
    path = a.json or f"benchmarks/results/mola_speed{'_quick' if a.quick else ''}.json"
    write_json(path, payload)
    md = path.rsplit(".", 1)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    sys.exit(main())
