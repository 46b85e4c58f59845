"""The GPU check: every CUDA test, then every Triton kernel timed against torch, in one prepared run.

    TRITON_INTERPRET=0 python3 benchmarks/gpu_check.py [--json PATH] [--quick] [--skip-tests] [--skip-timing]

(``benchmarks/gpu_check.sh`` sets the environment and runs it from the repository root.) It builds nothing:
the CUDA path is Triton, compiled at first call; the C++ extension is not needed.

1. ``tests/test_cuda.py`` under pytest with ``TRITON_INTERPRET=0`` (a subprocess writing JUnit XML; 8 workers
   through pytest-xdist where it is installed, as on the device image): counts of passed / failed / skipped
   tests and each failure's name and first line.
2. Each op at decode and prefill sizes (M = 1, 16, 128) on 4096 x 4096 and 11008 x 4096 layers:
   ``quant_matmul`` (4-bit and 3-bit, group 128), ``gwq_matmul`` (4-bit + 1% fp16 outliers), ``lora_mixed``
   (a LoRAQuant adapter of rank 16 and 64 on 4096 x 4096), ``multi_lora`` (64 distinct fp16 rank-16 adapters
   in a bank, T = M tokens spread over them), against torch: the fp16 dense matmul ``x @ W^T`` for the
   weight ops and the fp16 LoRA ``(x A^T) B^T`` (one adapter; gather + bmm for 64) for the adapter ops.
   Timed with CUDA events over warmed, L2-flushed repetitions (``triton.testing.do_bench``, medians and
   20/80% quantiles). Every row states the bytes the call must move, the roofline time at the device's peak
   HBM bandwidth (a table of known devices; the device-to-device copy bandwidth measured in the same run is
   reported beside it) and the bandwidth achieved.

Writes ``{"device", "tests_passed", "tests_failed", "tests_skipped", "failures", "peak_hbm_GBps",
"measured_copy_GBps", "rows": [...]}`` to benchmarks/results/gpu.json (or --json). On a machine without a
CUDA device it says so, writes the file with ``"device": null`` and no rows, and exits 0 (the CPU-side logic
is tested in tests/test_gpu_check.py). Budget: the whole run fits in 8 minutes on an H100/H200 (the tests take
most of it: each kernel variant compiles once); --quick times M = 1 and 16 on 4096 x 4096 only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: peak HBM bandwidth (bytes/s) of devices by a substring of their name (vendor data sheets)
PEAK_BW = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "GH200": 4.0e12,
           "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12, "L40S": 0.864e12,
           "L40": 0.864e12, "L4": 0.3e12, "A10G": 0.6e12, "A10": 0.6e12, "RTX 4090": 1.008e12, "V100": 0.9e12}


def peak_bandwidth(name: str | None) -> float | None:
    """The data-sheet HBM bandwidth (bytes/s) of a device name (the longest matching key), or None if unknown."""
    if not name:
        return None
    hits = [k for k in PEAK_BW if k in name]
    return PEAK_BW[max(hits, key=len)] if hits else None


def parse_junit(path) -> dict:
    """Counts and failures of a pytest JUnit XML report: ``{"passed", "failed", "skipped", "failures":
    [{"test", "message"}]}`` (errors count as failures; xfail as skipped, xpass as passed)."""
    root = ET.parse(path).getroot()
    passed = failed = skipped = 0
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            failed += 1
            msg = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append({"test": name, "message": msg[0][:300] if msg else ""})
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return {"passed": passed, "failed": failed, "skipped": skipped, "failures": failures}


def pytest_command(junit_path: Path, workers: int | None = None, extra=()) -> list[str]:
    """The pytest command line for the CUDA tests: JUnit output, and ``-n workers`` through pytest-xdist when it
    is installed (each kernel variant compiles once per worker; in parallel the compiles fit the time budget)."""
    import importlib.util
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_cuda.py"),
           f"--junitxml={junit_path}", *extra]
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    return cmd


def run_tests(junit_path: Path, timeout: int = 420, extra=()) -> dict:
    """tests/test_cuda.py under pytest with TRITON_INTERPRET=0; the parsed report (a timeout, or a run that wrote
    no report, counts as one more failure)."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(pytest_command(junit_path, extra=extra), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        tail, problem = (proc.stdout + proc.stderr)[-3000:], None
    except subprocess.TimeoutExpired:
        tail = problem = f"pytest timed out after {timeout} s"
    print(tail, flush=True)
    if junit_path.is_file():
        out = parse_junit(junit_path)
    else:
        out = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
        problem = problem or tail[-300:]
    if problem:
        out["failed"] += 1
        out["failures"].append({"test": "tests/test_cuda.py", "message": problem})
    out["seconds"] = time.perf_counter() - t0
    return out


def quant_bytes(N: int, K: int, bits: int, group: int, M: int, act_bytes: int = 2, nnz: int = 0) -> int:
    """Bytes a quantized matmul must move: packed codes, fp16 scales and zeros, CSR outliers (fp16 value +
    uint16 column each, int32 row pointers), the activations read and the output written."""
    w = N * K * bits // 8 + 2 * 2 * N * (K // group)
    o = nnz * 4 + (N + 1) * 4 if nnz else 0
    return w + o + M * K * act_bytes + M * N * act_bytes


def lora_bytes(N: int, K: int, r: int, h: int, bits_hi: int, group: int, M: int, act_bytes: int = 2) -> int:
    """Bytes of a LoRAQuant adapter call: codes (h components at bits_hi, r - h at 1 bit) and fp16 scales/zeros of
    A' and B'^T, plus x read, base read and y written."""
    codes = (h * bits_hi + (r - h)) * (N + K) // 8
    meta = 2 * 2 * r * (K // group + N // group)
    return codes + meta + M * K * act_bytes + 2 * M * N * act_bytes


def dense_lora_bytes(N: int, K: int, r: int, adapters: int, M: int, act_bytes: int = 2) -> int:
    """Bytes of fp16 LoRA over ``adapters`` distinct adapters: their A and B, x, base and y."""
    return adapters * r * (N + K) * 2 + M * K * act_bytes + 2 * M * N * act_bytes


def row(op: str, impl: str, shape, M: int, times_ms, nbytes: int, peak: float | None, **extra) -> dict:
    """One result row: median and 20/80% quantiles (ms), bytes moved, achieved GB/s, roofline ms at ``peak``."""
    med, lo, hi = times_ms
    out = {"op": op, "impl": impl, "N": shape[0], "K": shape[1], "M": M, "median_ms": med, "p20_ms": lo,
           "p80_ms": hi, "bytes": nbytes, "achieved_GBps": nbytes / (med * 1e-3) / 1e9}
    if peak:
        out["roofline_ms"] = nbytes / peak * 1e3
        out["fraction_of_peak"] = out["achieved_GBps"] * 1e9 / peak
    out.update(extra)
    return out


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}", flush=True)


def cuda_bench(fn) -> tuple[float, float, float]:
    """Median and 20/80% quantiles (ms) of ``fn`` on the GPU: CUDA events, L2 flushed between repetitions."""
    from triton.testing import do_bench
    return tuple(float(v) for v in do_bench(fn, warmup=10, rep=60, quantiles=[0.5, 0.2, 0.8]))


def timing_rows(quick: bool, peak: float | None, device="cuda", bench=cuda_bench, shapes=None, Ms=None,
                lora_shape=(4096, 4096), adapters: int = 64) -> list[dict]:
    """Every kernel against torch on ``device`` (the GPU check passes its defaults; the tests run the same code on
    the CPU at small shapes with a stand-in ``bench``, to check its calls)."""
    import torch

    from lorakern.formats.lora import LoraLayer
    from lorakern.multilora import AdapterBank
    from lorakern.quant import compress_lora
    from lorakern.testing import random_outliers, random_qweight

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    shapes = shapes or ([(4096, 4096)] if quick else [(4096, 4096), (11008, 4096)])
    Ms = Ms or ([1, 16] if quick else [1, 16, 128])
    for N, K in shapes:
        wd = (torch.randn(N, K, generator=gen) * 0.02).half().to(dev)
        ws = {bits: random_qweight(N, K, bits, 128, gen, device=dev) for bits in (4, 3)}
        o = random_outliers(N, K, "1pct", gen, device=dev)
        for M in Ms:
            x = torch.randn(M, K, generator=gen).half().to(dev)
            rows.append(row("matmul", "torch_fp16", (N, K), M, bench(lambda: x @ wd.t()),
                            N * K * 2 + 2 * M * (N + K), peak))
            for bits, w in ws.items():
                args = (w.qweight, w.scales, w.zeros, bits, 128)
                rows.append(row("quant_matmul", f"lorakern_{bits}bit", (N, K), M,
                                bench(lambda: torch.ops.lorakern.quant_matmul(x, *args)),
                                quant_bytes(N, K, bits, 128, M), peak, bits=bits, group_size=128))
            w = ws[4]
            rows.append(row("gwq_matmul", "lorakern_4bit_1pct", (N, K), M,
                            bench(lambda: torch.ops.lorakern.gwq_matmul(x, w.qweight, w.scales, w.zeros, 4, 128,
                                                                        o.row_ptr, o.col_idx, o.values)),
                            quant_bytes(N, K, 4, 128, M, nnz=o.nnz), peak, bits=4, nnz=o.nnz))
            print(f"{N}x{K} M={M}: " + ", ".join(f"{r['impl']} {r['median_ms']:.4f} ms" for r in rows[-4:]), flush=True)
    N, K = lora_shape
    for r in (16, 64):
        A = torch.randn(r, K, generator=gen) / K ** 0.5
        B = torch.randn(N, r, generator=gen) * 0.05
        c = compress_lora(B, A, rho=0.9, bits_high=2, scale=2.0)
        ad = [t.to(dev) for t in c.op_tensors()]
        Ah, Bh = A.half().to(dev), B.half().to(dev)
        for M in Ms:
            x = torch.randn(M, K, generator=gen).half().to(dev)
            base = torch.randn(M, N, generator=gen).half().to(dev)
            rows.append(row("lora", "torch_fp16", (N, K), M, bench(lambda: base + (x @ Ah.t()) @ Bh.t() * 2.0),
                            dense_lora_bytes(N, K, r, 1, M), peak, rank=r))
            ga, gb = c.group_sizes
            rows.append(row("lora_mixed", "lorakern_loraquant", (N, K), M,
                            bench(lambda: torch.ops.lorakern.lora_mixed(x, base, ad, c.bits_high, ga, gb, c.scale)),
                            lora_bytes(N, K, r, c.h, c.bits_high, ga, M), peak, rank=r, h=c.h))
    n = adapters
    bank = AdapterBank({"l": (N, K)}, dtype=torch.float16, device=dev)
    As = [torch.randn(16, K, generator=gen) / K ** 0.5 for _ in range(n)]
    Bs = [torch.randn(N, 16, generator=gen) * 0.05 for _ in range(n)]
    for i in range(n):
        bank.add(f"a{i}", {"l": LoraLayer(As[i], Bs[i], 2.0)})
    lb = bank.layers["l"]
    A_st = torch.stack(As).half().to(dev)
    Bt_st = torch.stack([b.t() for b in Bs]).half().to(dev) * 2.0
    for M in [m for m in Ms if m > 1]:
        ids = torch.arange(M) % n
        b = bank.batch(ids, device=dev)
        x = torch.randn(M, K, generator=gen).half().to(dev)
        base = torch.randn(M, N, generator=gen).half().to(dev)
        idd = ids.to(dev)
        used = min(M, n)
        rows.append(row("multi_lora", "torch_gather_bmm", (N, K), M,
                        bench(lambda: base + torch.bmm(torch.bmm(x.unsqueeze(1), A_st[idd].transpose(1, 2)),
                                                       Bt_st[idd]).squeeze(1)),
                        dense_lora_bytes(N, K, 16, used, M), peak, rank=16, adapters=n))
        rows.append(row("multi_lora", "lorakern_fp16_bank", (N, K), M, bench(lambda: lb.apply(x, base, b)),
                        dense_lora_bytes(N, K, 16, used, M), peak, rank=16, adapters=n))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    ap.add_argument("--quick", action="store_true", help="time M = 1 and 16 on 4096 x 4096 only")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--test-timeout", type=int, default=420, help="seconds for the CUDA tests (default 420)")
    ap.add_argument("--pytest-args", nargs="*", default=[], help="more pytest arguments, e.g. -k quant_matmul")
    a = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "0")
    if os.environ["TRITON_INTERPRET"] == "1":
        print("gpu_check: TRITON_INTERPRET=1 would run the kernels in the interpreter; unset it", file=sys.stderr)
        return 2
    import torch
    t0 = time.perf_counter()
    out = Path(a.json)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine: nothing to run (tests/test_cuda.py skips; "
              "LORAKERN_CUDA_TESTS_EMULATE=1 runs its checks in the Triton interpreter)", flush=True)
        write_json(out, {"device": None, "reason": "no CUDA device", "tests_passed": 0, "tests_failed": 0,
                         "tests_skipped": 0, "failures": [], "rows": []})
        return 0
    name = torch.cuda.get_device_name(0)
    peak = peak_bandwidth(name)
    payload = {"device": name, "capability": list(torch.cuda.get_device_capability(0)), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "peak_hbm_GBps": peak / 1e9 if peak else None}
    import triton
    payload["triton"] = triton.__version__
    # device-to-device copy bandwidth in this run (bytes read + written)
    buf = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(buf)
    from triton.testing import do_bench
    ms = do_bench(lambda: dst.copy_(buf), warmup=5, rep=30)
    payload["measured_copy_GBps"] = 2 * buf.numel() * 4 / (ms * 1e-3) / 1e9
    del buf, dst
    if not a.skip_tests:
        rep = run_tests(out.with_suffix(".junit.xml"), a.test_timeout, a.pytest_args)
        payload.update(tests_passed=rep["passed"], tests_failed=rep["failed"], tests_skipped=rep["skipped"],
                       failures=rep["failures"], tests_seconds=rep.get("seconds"))
        print(f"CUDA tests: {rep['passed']} passed, {rep['failed']} failed, {rep['skipped']} skipped", flush=True)
    write_json(out, payload)  # what the tests found survives a timing failure
    if not a.skip_timing:
        payload["rows"] = timing_rows(a.quick, peak)
    payload["seconds"] = time.perf_counter() - t0
    write_json(out, payload)
    return 0 if not payload.get("tests_failed") else 1


if __name__ == "__main__":
    sys.exit(main())
