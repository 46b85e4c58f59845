"""Compressed-LoRA kernels against their peers, in one run.

    python benchmarks/bench_lora.py [--quick] [--json PATH]

A 4-bit (group 128) 4096 x 4096 layer with a rank-r adapter, LoRAQuant-compressed
(rho 0.9, 2-bit high part) from a factor pair with a decaying spectrum. M in {1, 16},
r in {16, 64} (--quick: M = 1, r = 16). Impls, timed interleaved:

* ``base_only``: QuantLinear alone; ``base_plus_mixed``: LoRALinear(QuantLinear,
  compressed adapter), one call (quant_matmul_lora).
* the adapter alone, added to a given base output: ``lorakern_mixed`` (lora_mixed through
  ``PreparedLoRA``, the adapter validated once as LoRALinear does; ``lorakern_mixed_checked``
  is the torch.library op's CPU kernel with every argument checked on each call;
  ``lorakern_mixed_c_abi`` calls the C++ kernel directly, as a stack embedding the C ABI would) against
  ``torch_lora``, the same adapter unquantized, ``base + (x A^T) B^T * s`` in whichever of
  fp32 / bf16 / fp16 torch runs fastest here (all three are timed; the row says which);
  ``lorakern_mixed_inplace`` (``PreparedLoRA.lora_mixed_``: base += adapter, no output allocation, as an engine's
  ``y += lora(x)``) against ``torch_lora_inplace``, the fastest of torch's ``base.addmm_(x A^T, B^T, alpha=s)``
  (fp32) and the out-of-place rows.
* extra rows: ``base_plus_mixed_unfused`` (QuantLinear, then lora_mixed: two calls),
  ``base_plus_torch_lora`` (QuantLinear plus torch's fp32 adapter), and each torch dtype.

Every layer copy has its own weights and adapter; copies rotate so the base rows stream
>= 256 MiB of weights, and the adapter-alone rows rotate 256 MiB worth of fp32 adapters
(at r = 16: 512 distinct adapters; the same number of compressed ones is ~6 % of that and
stays in L3 -- the point of compressing them). Medians of per-call times.
Writes benchmarks/results/lora.json (quick: lora_quick.json).
"""
from __future__ import annotations

import argparse
import os

import torch

from common import Case, copies_for, machine_info, run_interleaved, summary, write_json

from lorakern.nn import LoRALinear, QuantLinear
from lorakern._native import native
from lorakern.ops.cpu import PreparedLoRA, lora_mixed_cpu
from lorakern.quant import compress_lora
from lorakern.formats import QuantizedWeight

N = K = 4096
G = 128
SCALE = 2.0


def random_base(gen):
    return QuantizedWeight(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen),
                           (torch.rand(N, K // G, generator=gen) * 0.02 + 1e-3).half(),
                           (torch.rand(N, K // G, generator=gen) * 15).half(), 4, G)


def setup(r, gen):
    """A base layer stack and rank-r adapters (compressed, fp32 / bf16 / fp16 copies)."""
    B = torch.randn(N, r, generator=gen) * (0.7 ** torch.arange(r)) * 0.05
    A = torch.randn(r, K, generator=gen) / K ** 0.5
    c = compress_lora(B, A, rho=0.9, bits_high=2, scale=SCALE)
    return B, A, c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=None)
    a = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    torch.set_grad_enabled(False)
    nat = native()
    base_bytes = N * K // 2 + 2 * 2 * N * (K // G)
    nb = copies_for(base_bytes)
    qls = [QuantLinear(random_base(gen)) for _ in range(nb)]
    Ms, ranks = ((1,), (16,)) if a.quick else ((1, 16), (16, 64))
    rows, extra, info = [], [], {}
    for r in ranks:
        B, A, c = setup(r, gen)
        ad = c.op_tensors()
        ga, gb = c.group_sizes
        adapter_bytes = sum(t.numel() * t.element_size() for t in ad)
        na = copies_for(r * (N + K) * 4)
        info[r] = {"h": c.h, "bits_per_param": c.bits_per_param(), "adapter_bytes": adapter_bytes,
                   "fp32_adapter_bytes": r * (N + K) * 4, "adapter_copies": na, "base_copies": nb}
        print(f"r={r}: h={c.h}, {c.bits_per_param():.2f} bits/param, {adapter_bytes} bytes compressed; "
              f"{nb} base copies, {na} adapter copies", flush=True)
        fused = []
        for q in qls:
            f = LoRALinear(q, c)
            for name in f.format_buffer_names():  # distinct adapter memory per layer
                setattr(f, name, getattr(f, name).clone())
            fused.append(f)
        fps = {dt: [(A.to(dt).clone(), B.to(dt).clone()) for _ in range(na)]
               for dt in (torch.float32, torch.bfloat16, torch.float16)}
        ads = [[t.clone() for t in ad] for _ in range(na)]
        preps = [PreparedLoRA(a_, 2, ga, gb, N, K, SCALE) for a_ in ads]  # validated once, as LoRALinear does
        for M in Ms:
            x = torch.randn(M, K, generator=gen)
            base0 = torch.randn(M, N, generator=gen)
            yout = torch.empty(M, N)
            yacc = base0.clone()  # the in-place rows add into it (its values do not matter for speed)

            def torch_lora(dt):
                xs, ws = x.to(dt), fps[dt]
                return lambda i: base0 + ((xs @ ws[i][0].t()) @ ws[i][1].t() * SCALE).float()
            cases = {
                "base_only": Case("base_only", lambda i: qls[i](x), nb, base_bytes),
                "base_plus_mixed": Case("base_plus_mixed", lambda i: fused[i](x), nb, base_bytes + adapter_bytes),
                "base_plus_mixed_unfused": Case(
                    "base_plus_mixed_unfused",
                    lambda i: lora_mixed_cpu(x, qls[i](x), fused[i].adapter_tensors(), 2, ga, gb, SCALE), nb),
                "base_plus_torch_lora": Case(
                    "base_plus_torch_lora",
                    lambda i: qls[i](x) + (x @ fps[torch.float32][i][0].t()) @ fps[torch.float32][i][1].t() * SCALE,
                    nb),
                "lorakern_mixed": Case("lorakern_mixed", lambda i: preps[i].lora_mixed(x, base0), na, adapter_bytes),
                "lorakern_mixed_inplace": Case("lorakern_mixed_inplace", lambda i: preps[i].lora_mixed_(x, yacc), na,
                                               adapter_bytes),
                "torch_lora_fp32_inplace": Case(
                    "torch_lora_fp32_inplace",
                    lambda i: yacc.addmm_(x @ fps[torch.float32][i][0].t(), fps[torch.float32][i][1].t(), alpha=SCALE),
                    na),
                "lorakern_mixed_c_abi": Case(
                    "lorakern_mixed_c_abi",
                    lambda i: nat.lora_mixed(x.data_ptr(), 0, M, preps[i].record, base0.data_ptr(),
                                             yout.data_ptr(), torch.get_num_threads()), na),
                "lorakern_mixed_checked": Case("lorakern_mixed_checked",
                                               lambda i: lora_mixed_cpu(x, base0, ads[i], 2, ga, gb, SCALE), na),
                "torch_lora_fp32": Case("torch_lora_fp32", torch_lora(torch.float32), na),
                "torch_lora_bf16": Case("torch_lora_bf16", torch_lora(torch.bfloat16), na),
                "torch_lora_fp16": Case("torch_lora_fp16", torch_lora(torch.float16), na),
            }
            run_interleaved(list(cases.values()), rounds=a.rounds or (10 if a.quick else 20))
            st = {k: summary(cs) for k, cs in cases.items()}
            best = min(("fp32", "bf16", "fp16"), key=lambda d: st[f"torch_lora_{d}"]["median_ms"])
            for impl in ("base_only", "base_plus_mixed", "lorakern_mixed"):
                rows.append({"impl": impl, "M": M, "r": r, **st[impl]})
            rows.append({"impl": "torch_lora", "M": M, "r": r, "dtype": best, **st[f"torch_lora_{best}"]})
            rows.append({"impl": "lorakern_mixed_inplace", "M": M, "r": r, **st["lorakern_mixed_inplace"]})
            best_ip = min(("fp32_inplace", "fp32", "bf16", "fp16"), key=lambda d: st[f"torch_lora_{d}"]["median_ms"])
            rows.append({"impl": "torch_lora_inplace", "M": M, "r": r, "dtype": best_ip,
                         **st[f"torch_lora_{best_ip}"]})
            for impl in ("base_plus_mixed_unfused", "base_plus_torch_lora", "lorakern_mixed_checked",
                         "lorakern_mixed_c_abi",
                         "torch_lora_fp32", "torch_lora_bf16", "torch_lora_fp16", "torch_lora_fp32_inplace"):
                extra.append({"impl": impl, "M": M, "r": r, **st[impl]})
            for k, v in st.items():
                print(f"r={r:3d} M={M:3d} {k:24s} {v['median_ms']:8.4f} ms  [{v['p25_ms']:.4f}, {v['p75_ms']:.4f}]",
                      flush=True)
    med = {(x["impl"], x["M"], x["r"]): x["median_ms"] for x in rows + extra}
    ratios = {f"M={M},r={r}": {
        "base_plus_mixed_over_base_only": med[("base_plus_mixed", M, r)] / med[("base_only", M, r)],
        "unfused_over_base_only": med[("base_plus_mixed_unfused", M, r)] / med[("base_only", M, r)],
        "torch_lora_over_lorakern_mixed": med[("torch_lora", M, r)] / med[("lorakern_mixed", M, r)],
        "torch_lora_over_lorakern_mixed_c_abi": med[("torch_lora", M, r)] / med[("lorakern_mixed_c_abi", M, r)],
        "torch_lora_inplace_over_lorakern_mixed_inplace": med[("torch_lora_inplace", M, r)]
        / med[("lorakern_mixed_inplace", M, r)]}
        for r in ranks for M in Ms}
    for k, v in ratios.items():
        print(k, {n: round(x, 3) for n, x in v.items()})
    payload = {"machine": machine_info(), "N": N, "K": K, "group_size": G, "base_bits": 4, "adapters": info,
               "rows": rows, "extra_rows": extra, "ratios": ratios,
               "targets": {"base_plus_mixed_over_base_only at M=1": "<= 1.05",
                           "torch_lora_over_lorakern_mixed at M=1": ">= 4"}}
    out = a.json or os.path.join(os.path.dirname(__file__), "results", "lora_quick.json" if a.quick else "lora.json")
    write_json(out, payload)


if __name__ == "__main__":
    main()
