"""Shared benchmark helpers: interleaved timing over rotating weight stacks, the
machine's read bandwidth measured in the same run, medians and spreads."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

STACK_BYTES = 256 * 2**20  # rotate through at least this much so L3 (32 MiB) cannot serve the weights


def gemv_args(argv, doc: str, name: str, quick_help: str):
    """The GEMV benchmarks' command line (--quick, --json, --rounds) and their shapes:
    ``(args, [(N, K)], [M], rounds)``."""
    import argparse
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", help=f"write results here (default benchmarks/results/{name}.json; quick: "
                                   f"{name}_quick.json)")
    ap.add_argument("--rounds", type=int, default=None)
    a = ap.parse_args(argv)
    shapes = [(4096, 4096)] if a.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    Ms = [1, 16] if a.quick else [1, 4, 16, 128]
    return a, shapes, Ms, a.rounds or (3 if a.quick else 5)


def copies_for(bytes_per_copy: int, min_total: int = STACK_BYTES, at_least: int = 2) -> int:
    """Number of weight copies to rotate through so that their total exceeds ``min_total``."""
    return max(at_least, -(-min_total // max(1, bytes_per_copy)))


@dataclass
class Case:
    """One thing to time: ``fn(i)`` runs call number i (rotating through copies inside)."""
    name: str
    fn: Callable[[int], object]
    copies: int
    bytes_per_call: int = 0
    times: list = field(default_factory=list)


def bandwidth_case(nbytes: int = STACK_BYTES) -> Case:
    """Read bandwidth: torch.sum over an fp32 tensor of ``nbytes`` (all threads)."""
    t = torch.randn(nbytes // 4)
    return Case("read_bw", lambda i: t.sum(), copies=1, bytes_per_call=nbytes)


def run_interleaved(cases: list[Case], rounds: int, min_calls: int = 3, max_seconds_per_round: float = 1.0) -> None:
    """A B C A B C ...: each round runs every case for one pass over its copies
    (at least ``min_calls`` calls, capped by ``max_seconds_per_round``), timing each call."""
    for c in cases:  # warm up: one pass, untimed
        for i in range(min(c.copies, 3)):
            c.fn(i)
    counters = {c.name: 0 for c in cases}
    for _ in range(rounds):
        for c in cases:
            calls = max(min_calls, c.copies)
            t_round = time.perf_counter()
            for _ in range(calls):
                i = counters[c.name]
                counters[c.name] += 1
                t0 = time.perf_counter()
                c.fn(i % c.copies)
                c.times.append(time.perf_counter() - t0)
                if time.perf_counter() - t_round > max_seconds_per_round:
                    break


def summary(c: Case) -> dict:
    """Median, quartiles and count of a case's call times (ms)."""
    ts = sorted(c.times)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 4 else [ts[0], statistics.median(ts), ts[-1]]
    return {"median_ms": statistics.median(ts) * 1e3, "p25_ms": q[0] * 1e3, "p75_ms": q[2] * 1e3, "calls": len(ts)}


def machine_info() -> dict:
    import lorakern
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "lorakern_isa": lorakern.active_isa(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")
