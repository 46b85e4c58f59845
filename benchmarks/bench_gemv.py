"""Low-bit matmul benchmark: lorakern's quant_matmul against torch's own kernels.

    python benchmarks/bench_gemv.py [--quick] [--json PATH]

In one run, for (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008)} and
M in {1, 4, 16, 128}: lorakern at 2, 3 and 4 bits (group 128, fp32
activations); torch fp32 and bf16 linear; torch's int4 (group 128) and int8
weight-only CPU kernels (bf16 activations, their fastest here). Every impl
rotates through copies of its weights totalling >= 256 MiB, so caches cannot
serve them; impls are timed interleaved (A B C A B C ...) together with the
machine's read bandwidth, and medians are reported. --quick: M = 1 and 16 on
(4096, 4096) only.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from common import gemv_args, Case, bandwidth_case, copies_for, machine_info, run_interleaved, summary, write_json

import lorakern

G = 128


def lorakern_case(bits, M, N, K):
    rb = K * bits // 8
    nbytes = N * rb + 2 * 2 * N * (K // G)
    n = copies_for(nbytes)
    ws = [(torch.randint(0, 256, (N, rb), dtype=torch.uint8), (torch.rand(N, K // G) * 0.02 + 1e-3).half(),
           (torch.rand(N, K // G) * ((1 << bits) - 1)).half()) for _ in range(n)]
    x = torch.randn(M, K)
    op = torch.ops.lorakern.quant_matmul
    return Case(f"lorakern{bits}", lambda i: op(x, *ws[i], bits, G), n, nbytes)


def torch_dense_case(dtype, M, N, K):
    nbytes = N * K * dtype.itemsize
    n = copies_for(nbytes)
    ws = [torch.randn(N, K, dtype=dtype) for _ in range(n)]
    x = torch.randn(M, K, dtype=dtype)
    return Case("torch_fp32" if dtype == torch.float32 else "torch_bf16",
                lambda i: torch.nn.functional.linear(x, ws[i]), n, nbytes)


def torch_int4_case(M, N, K):
    nbytes = N * K // 2 + N * (K // G) * 2 * 2
    n = copies_for(nbytes)
    ws = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 1),
           torch.rand(K // G, N, 2, dtype=torch.bfloat16)) for _ in range(n)]
    x = torch.randn(M, K, dtype=torch.bfloat16)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu
    return Case("torch_int4", lambda i: op(x, ws[i][0], G, ws[i][1]), n, nbytes)


def torch_int8_case(M, N, K):
    nbytes = N * K + N * 2
    n = copies_for(nbytes)
    ws = [(torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N, dtype=torch.bfloat16)) for _ in range(n)]
    x = torch.randn(M, K, dtype=torch.bfloat16)
    op = torch.ops.aten._weight_int8pack_mm
    return Case("torch_int8", lambda i: op(x, ws[i][0], ws[i][1]), n, nbytes)


IMPL = {"lorakern2": ("lorakern", 2), "lorakern3": ("lorakern", 3), "lorakern4": ("lorakern", 4),
        "torch_fp32": ("torch_fp32", 32), "torch_bf16": ("torch_bf16", 16), "torch_int4": ("torch_int4", 4),
        "torch_int8": ("torch_int8", 8)}


def main(argv=None) -> int:
    a, shapes, Ms, rounds = gemv_args(argv, __doc__, "gemv", "M = 1 and 16 on 4096x4096 only (< 60 s)")
    rows, bw_times = [], []
    print(f"{'N':>6} {'K':>6} {'M':>4}  {'impl':11} {'bits':>4} {'median ms':>10} {'p25':>8} {'p75':>8} {'GB/s':>7} {'%bw':>5}")
    for N, K in shapes:
        for M in Ms:
            bw = bandwidth_case()
            cases = [lorakern_case(b, M, N, K) for b in (2, 3, 4)] + [
                torch_dense_case(torch.float32, M, N, K), torch_dense_case(torch.bfloat16, M, N, K),
                torch_int4_case(M, N, K), torch_int8_case(M, N, K), bw]
            run_interleaved(cases, rounds, max_seconds_per_round=0.6 if a.quick else 1.5)
            bw_gbps = bw.bytes_per_call / (summary(bw)["median_ms"] * 1e-3) / 1e9
            bw_times.append(bw_gbps)
            for c in cases[:-1]:
                s = summary(c)
                impl, bits = IMPL[c.name]
                gbps = c.bytes_per_call / (s["median_ms"] * 1e-3) / 1e9
                rows.append({"impl": impl, "bits": bits, "M": M, "N": N, "K": K, **s,
                             "weight_bytes": c.bytes_per_call, "gbps": gbps, "read_gbps_same_group": bw_gbps})
                print(f"{N:>6} {K:>6} {M:>4}  {impl:11} {bits:>4} {s['median_ms']:>10.3f} {s['p25_ms']:>8.3f} "
                      f"{s['p75_ms']:>8.3f} {gbps:>7.1f} {100 * gbps / bw_gbps:>5.0f}", flush=True)
            del cases
    read_gbps = sorted(bw_times)[len(bw_times) // 2]
    print(f"\nread bandwidth (torch.sum over 256 MiB fp32, interleaved with the kernels): median {read_gbps:.1f} GB/s")
    _targets(rows, read_gbps)
    path = a.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  "gemv_quick.json" if a.quick else "gemv.json")
    write_json(path, {"read_gbps": read_gbps, "machine": machine_info(), "group_size": G, "rows": rows})
    return 0


def _targets(rows, read_gbps):
    def get(impl, bits, M, N=4096, K=4096):
        return next((r for r in rows if r["impl"] == impl and r["bits"] == bits and r["M"] == M
                     and r["N"] == N and r["K"] == K), None)
    l4, t4, l2 = get("lorakern", 4, 1), get("torch_int4", 4, 1), get("lorakern", 2, 1)
    print("targets (4096x4096):")
    if l4 and t4:
        print(f"  M=1 4-bit: {100 * l4['gbps'] / l4['read_gbps_same_group']:.0f}% of read bandwidth (target >= 85%), "
              f"{t4['median_ms'] / l4['median_ms']:.2f}x torch_int4 (target >= 1.4x)")
    if l2:
        print(f"  M=1 2-bit: {100 * l2['gbps'] / l2['read_gbps_same_group']:.0f}% of read bandwidth (target >= 75%)")
    l128, b128 = get("lorakern", 4, 128), get("torch_bf16", 16, 128)
    if l128 and b128:
        print(f"  M=128 4-bit: {b128['median_ms'] / l128['median_ms']:.2f}x torch_bf16 (target >= 1x)")


if __name__ == "__main__":
    sys.exit(main())
