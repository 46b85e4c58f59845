"""GWQ matmul benchmark: lorakern's gwq_matmul (dense low-bit + CSR outliers, one
fused pass) against the dense-only quant_matmul at the same bits and torch fp32.

    python benchmarks/bench_gwq.py [--quick] [--json PATH]

In one run, for (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008)} and
M in {1, 4, 16, 128}: gwq at 3 and 4 bits (group 128) with 1% outliers (and 0.5%
and 2% at M = 1 and 16 on 4096x4096), the dense-only kernel at the same bits,
torch fp32 linear. Outliers are spread uniformly at random (about frac * K per
row, as GWQ's per-matrix budget gives on real layers). Every impl rotates through
copies of its weights totalling >= 256 MiB; impls are timed interleaved and
medians are reported. --quick: M = 1 and 16 on 4096x4096, 4-bit, 1% (< 60 s).
Writes benchmarks/results/gwq.json (quick: gwq_quick.json).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from common import gemv_args, Case, copies_for, machine_info, run_interleaved, summary, write_json

import lorakern
from lorakern.formats import SparseOutliers

G = 128


def _dense(bits, N, K):
    rb = K * bits // 8
    return (torch.randint(0, 256, (N, rb), dtype=torch.uint8), (torch.rand(N, K // G) * 0.02 + 1e-3).half(),
            (torch.rand(N, K // G) * ((1 << bits) - 1)).half())


def _outliers(N, K, frac, gen):
    mask = torch.rand(N, K, generator=gen) < frac
    o = SparseOutliers.from_mask(mask, torch.randn(N, K, generator=gen) * 0.1)
    return o.row_ptr, o.col_idx, o.values


def gwq_case(bits, frac, M, N, K, gen):
    nnz = int(round(frac * N * K))
    nbytes = N * K * bits // 8 + 2 * 2 * N * (K // G) + nnz * 4 + (N + 1) * 4
    n = copies_for(nbytes)
    ws = [(*_dense(bits, N, K), *_outliers(N, K, frac, gen)) for _ in range(n)]
    x = torch.randn(M, K)
    op = torch.ops.lorakern.gwq_matmul

    def fn(i):
        q, s, z, rp, ci, v = ws[i]
        return op(x, q, s, z, bits, G, rp, ci, v)
    return Case(f"gwq{bits}_{frac}", fn, n, nbytes)


def dense_case(bits, M, N, K):
    nbytes = N * K * bits // 8 + 2 * 2 * N * (K // G)
    n = copies_for(nbytes)
    ws = [_dense(bits, N, K) for _ in range(n)]
    x = torch.randn(M, K)
    op = torch.ops.lorakern.quant_matmul
    return Case(f"dense{bits}", lambda i: op(x, *ws[i], bits, G), n, nbytes)


def fp32_case(M, N, K):
    nbytes = N * K * 4
    n = copies_for(nbytes)
    ws = [torch.randn(N, K) for _ in range(n)]
    x = torch.randn(M, K)
    return Case("torch_fp32", lambda i: torch.nn.functional.linear(x, ws[i]), n, nbytes)


def main(argv=None) -> int:
    a, shapes, Ms, rounds = gemv_args(argv, __doc__, "gwq", "M = 1 and 16 on 4096x4096, 4-bit, 1%% (< 60 s)")
    bits_list = (4,) if a.quick else (3, 4)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'N':>6} {'K':>6} {'M':>4}  {'impl':10} {'bits':>4} {'outl':>5} {'median ms':>10} {'p25':>8} {'p75':>8} "
          f"{'vs dense':>8}")
    for N, K in shapes:
        for M in Ms:
            fracs = (0.005, 0.01, 0.02) if (N, K) == (4096, 4096) and M in (1, 16) and not a.quick else (0.01,)
            cases, meta = [], {}
            for bits in bits_list:
                c = dense_case(bits, M, N, K)
                cases.append(c)
                meta[c.name] = ("dense", bits, 0.0)
                for f in fracs:
                    c = gwq_case(bits, f, M, N, K, gen)
                    cases.append(c)
                    meta[c.name] = ("gwq", bits, f)
            c = fp32_case(M, N, K)
            cases.append(c)
            meta[c.name] = ("torch_fp32", 32, 0.0)
            run_interleaved(cases, rounds, max_seconds_per_round=0.6 if a.quick else 1.5)
            dense_ms = {}
            for c in cases:
                impl, bits, f = meta[c.name]
                s = summary(c)
                if impl == "dense":
                    dense_ms[bits] = s["median_ms"]
                ratio = s["median_ms"] / dense_ms[bits] if bits in dense_ms else float("nan")
                rows.append({"impl": impl, "bits": bits, "outlier_frac": f, "M": M, "N": N, "K": K, **s,
                             "weight_bytes": c.bytes_per_call})
                print(f"{N:>6} {K:>6} {M:>4}  {impl:10} {bits:>4} {f:>5.3f} {s['median_ms']:>10.3f} {s['p25_ms']:>8.3f} "
                      f"{s['p75_ms']:>8.3f} {ratio:>8.2f}", flush=True)
            del cases
    print("targets (4096x4096, 1% outliers): gwq / dense-only time")
    for bits in bits_list:
        for M, target in ((1, 1.2), (16, 1.3)):
            g = next((r for r in rows if r["impl"] == "gwq" and r["bits"] == bits and r["M"] == M
                      and r["outlier_frac"] == 0.01 and r["N"] == 4096 and r["K"] == 4096), None)
            d = next((r for r in rows if r["impl"] == "dense" and r["bits"] == bits and r["M"] == M
                      and r["N"] == 4096 and r["K"] == 4096), None)
            if g and d:
                ratio = g["median_ms"] / d["median_ms"]
                print(f"  {bits}-bit M={M}: {ratio:.2f}x (target <= {target}x) {'met' if ratio <= target else 'MISSED'}")
    path = a.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  "gwq_quick.json" if a.quick else "gwq.json")
    write_json(path, {"machine": machine_info(), "group_size": G, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
